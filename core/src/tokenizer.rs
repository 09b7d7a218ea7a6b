//! Tokenizer merging and embedding permutation (spec §1.7, §1.8, §3.5).
//!
//! Works on `tokenizer.json` directly: the output vocabulary is the base
//! tokenizer (stripped of ids beyond its model's vocabulary size), a chosen
//! model's tokenizer, or the union of all; tokens new to the base are
//! appended as added tokens, as transformers' `add_tokens` does. For every
//! embedding-like tensor (`is_embed`), each model's matrix is re-indexed to
//! the output vocabulary before merging, so a token known to only one model
//! keeps that model's vector.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};

use crate::architecture::{Architecture, config_path};
use crate::config::{EmbedSource, MergeConfig, ModelRef, TokenizerConfig, TokenizerSource};
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::tensor::Tensor;

/// One model's vocabulary.
#[derive(Debug, Clone)]
pub struct ModelVocab {
    pub json: Value,
    /// token → id, model vocabulary plus added tokens.
    pub ids: HashMap<String, u32>,
    /// Added tokens (content → entry), in id order.
    pub added: Vec<Value>,
    /// Size of the model's embedding (config vocab size).
    pub vocab_size: usize,
}

fn model_vocab_map(tj: &Value) -> HashMap<String, u32> {
    let mut m = HashMap::new();
    match tj.pointer("/model/vocab") {
        Some(Value::Object(o)) => {
            for (k, v) in o {
                if let Some(id) = v.as_u64() {
                    m.insert(k.clone(), id as u32);
                }
            }
        }
        Some(Value::Array(a)) => {
            for (i, p) in a.iter().enumerate() {
                if let Some(s) = p.get(0).and_then(|s| s.as_str()) {
                    m.insert(s.to_string(), i as u32);
                }
            }
        }
        _ => {}
    }
    m
}

/// Loads a model's tokenizer.json (None when it has none).
pub fn load_vocab(model: &LoadedModel, arch: &Architecture) -> Result<Option<ModelVocab>> {
    let loc = &model.location;
    if !loc.exists("tokenizer.json")? {
        return Ok(None);
    }
    let text = loc.read_to_string("tokenizer.json")?;
    let json: Value = serde_json::from_str(&text).map_err(|e| {
        Error::format(
            loc.file_display("tokenizer.json"),
            format!("not valid JSON: {e}"),
        )
    })?;
    let mut ids = model_vocab_map(&json);
    let mut added: Vec<Value> = json
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .cloned()
        .unwrap_or_default();
    added.sort_by_key(|t| t.get("id").and_then(|i| i.as_u64()).unwrap_or(0));
    for t in &added {
        if let (Some(c), Some(id)) = (
            t.get("content").and_then(|c| c.as_str()),
            t.get("id").and_then(|i| i.as_u64()),
        ) {
            ids.insert(c.to_string(), id as u32);
        }
    }
    let vocab_size = config_path(&model.config, arch.vocab_size_key())
        .or_else(|| model.config.get("vocab_size"))
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .unwrap_or(ids.len());
    Ok(Some(ModelVocab {
        json,
        ids,
        added,
        vocab_size,
    }))
}

/// Removes tokens with id ≥ `v` (BPE only: vocab, added tokens, merges).
fn strip(tj: &mut Value, v: u32) {
    let mut removed: HashSet<String> = HashSet::new();
    if let Some(Value::Object(o)) = tj.pointer_mut("/model/vocab") {
        o.retain(|k, id| {
            let keep = id.as_u64().is_none_or(|i| i < v as u64);
            if !keep {
                removed.insert(k.clone());
            }
            keep
        });
    }
    if let Some(Value::Array(a)) = tj.get_mut("added_tokens") {
        a.retain(|t| {
            let keep = t
                .get("id")
                .and_then(|i| i.as_u64())
                .is_none_or(|i| i < v as u64);
            if !keep && let Some(c) = t.get("content").and_then(|c| c.as_str()) {
                removed.insert(c.to_string());
            }
            keep
        });
    }
    if removed.is_empty() {
        return;
    }
    if let Some(Value::Array(m)) = tj.pointer_mut("/model/merges") {
        m.retain(|mg| {
            let parts: Vec<String> = match mg {
                Value::String(s) => s.split(' ').map(str::to_string).collect(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
                _ => vec![],
            };
            let joined: String = parts.concat();
            !parts.iter().any(|p| removed.contains(p)) && !removed.contains(&joined)
        });
    }
}

/// Appends a token as an added token (transformers `add_tokens`).
fn add_token(
    tj: &mut Value,
    ids: &mut HashMap<String, u32>,
    content: &str,
    template: Option<&Value>,
) {
    if ids.contains_key(content) {
        return;
    }
    let id = ids.values().map(|i| i + 1).max().unwrap_or(0);
    let mut entry = template.cloned().unwrap_or_else(|| {
        json!({"single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": false})
    });
    entry["id"] = json!(id);
    entry["content"] = json!(content);
    if let Some(Value::Array(a)) = tj.get_mut("added_tokens") {
        a.push(entry);
    } else {
        tj["added_tokens"] = json!([entry]);
    }
    ids.insert(content.to_string(), id);
}

/// Where an output token's fallback embedding comes from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DefaultRow {
    Zero,
    /// Mean of these rows: (model index, row in that model's matrix).
    Mean(Vec<(usize, u32)>),
    /// No source could be found (reported as a warning; zeros).
    Missing,
}

/// How every vocabulary-sized tensor is re-indexed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EmbedPermutation {
    /// Real output vocabulary size.
    pub vocab_len: usize,
    /// Rows after padding to `pad_to_multiple_of`.
    pub rows: usize,
    /// Per model index: its own row for each output token (None: use the default).
    pub own: BTreeMap<usize, Vec<Option<u32>>>,
    /// Per model index: its row for each output token, forced or not.
    pub present: BTreeMap<usize, Vec<Option<u32>>>,
    /// Per output token: the fallback the configuration names (`tokens:`
    /// with a `source`), `None` where it is chosen from the tensor's
    /// inputs ([`EmbedPermutation::defaults_for`]).
    pub explicit: Vec<Option<DefaultRow>>,
}

impl EmbedPermutation {
    /// Fallback rows for one tensor whose inputs are `inputs` (model
    /// indices, configuration order) with base model `base`, as mergekit
    /// 0.1.5's `PermutedVocabulary` picks them from the tensor's own inputs:
    /// a token only one input has comes from it; one no input has is zero;
    /// else the base's row where the base is an input and has it; else
    /// the mean over the inputs that have it. A named source must be one
    /// of the inputs. Returns the rows and warnings.
    pub fn defaults_for(
        &self,
        inputs: &[usize],
        base: Option<usize>,
        reference: impl Fn(usize) -> String,
    ) -> std::result::Result<(Vec<DefaultRow>, Vec<String>), String> {
        let mut warnings = Vec::new();
        let mut out = Vec::with_capacity(self.vocab_len);
        for j in 0..self.vocab_len {
            let needed = inputs.iter().any(|m| self.own[m][j].is_none());
            let d = match &self.explicit[j] {
                _ if !needed => DefaultRow::Zero,
                Some(DefaultRow::Mean(rows)) => {
                    if let Some((m, _)) = rows.iter().find(|(m, _)| !inputs.contains(m)) {
                        return Err(format!(
                            "token id {j} takes its row from model {}, which does not provide this tensor",
                            reference(*m)
                        ));
                    }
                    DefaultRow::Mean(rows.clone())
                }
                Some(d) => d.clone(),
                None => {
                    let having: Vec<(usize, u32)> = inputs
                        .iter()
                        .filter_map(|m| self.present[m][j].map(|id| (*m, id)))
                        .collect();
                    if having.len() == 1 {
                        DefaultRow::Mean(having)
                    } else if having.is_empty() {
                        warnings.push(format!(
                            "token id {j} is in no input's embedding; it gets a zero vector"
                        ));
                        DefaultRow::Zero
                    } else if let Some(b) = having.iter().find(|(m, _)| Some(*m) == base) {
                        DefaultRow::Mean(vec![*b])
                    } else {
                        DefaultRow::Mean(having)
                    }
                }
            };
            out.push(d);
        }
        Ok((out, warnings))
    }
}

/// The merged tokenizer: files to write and the permutation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerOutput {
    pub files: Vec<(String, String)>,
    pub permutation: EmbedPermutation,
    pub warnings: Vec<String>,
}

/// Builds the output tokenizer (spec §3.5). `base` is the index of the base
/// model (or the first referenced model).
pub fn build(
    tcfg: &TokenizerConfig,
    models: &[LoadedModel],
    arch: &Architecture,
    base: usize,
    in_set: &[usize],
) -> Result<TokenizerOutput> {
    let mut warnings = Vec::new();
    let vocabs: Vec<Option<ModelVocab>> = models
        .iter()
        .map(|m| load_vocab(m, arch))
        .collect::<Result<_>>()?;
    let base_vocab = vocabs[base].clone().ok_or_else(|| {
        Error::msg(format!(
            "tokenizer merge: base model {} has no tokenizer.json",
            models[base].reference
        ))
    })?;
    let vocab_of = |m: usize| -> &ModelVocab {
        match &vocabs[m] {
            Some(v) => v,
            None => &base_vocab,
        }
    };
    for (i, v) in vocabs.iter().enumerate() {
        if v.is_none() {
            warnings.push(format!(
                "model {} has no tokenizer.json; using the base tokenizer's vocabulary for it",
                models[i].reference
            ));
        }
    }
    let idx_of = |r: &ModelRef| models.iter().position(|m| &m.reference == r);
    let (mut out_json, source_dir) = match &tcfg.source {
        TokenizerSource::Model(r) => {
            let m = idx_of(r).ok_or_else(|| {
                Error::msg(format!(
                    "tokenizer source {r} is not one of the merged models"
                ))
            })?;
            let v = vocabs[m]
                .clone()
                .ok_or_else(|| Error::msg(format!("tokenizer source {r} has no tokenizer.json")))?;
            (v.json, models[m].location.clone())
        }
        _ => {
            let mut j = base_vocab.json.clone();
            strip(&mut j, base_vocab.vocab_size as u32);
            (j, models[base].location.clone())
        }
    };
    let mut ids: HashMap<String, u32> = model_vocab_map(&out_json);
    for t in out_json
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .cloned()
        .unwrap_or_default()
    {
        if let (Some(c), Some(id)) = (
            t.get("content").and_then(|c| c.as_str()),
            t.get("id").and_then(|i| i.as_u64()),
        ) {
            ids.insert(c.to_string(), id as u32);
        }
    }
    if tcfg.source == TokenizerSource::Union {
        // mergekit's order: every model's plain tokens first (base first,
        // then the others; within a model by id), then every added token
        let mut order: Vec<usize> = vec![base];
        order.extend((0..models.len()).filter(|m| *m != base));
        let mut added_all: Vec<&Value> = Vec::new();
        let mut added_seen: HashSet<&str> = HashSet::new();
        for &m in &order {
            let Some(v) = &vocabs[m] else { continue };
            for t in &v.added {
                let id = t.get("id").and_then(|i| i.as_u64()).unwrap_or(u64::MAX);
                if let Some(c) = t.get("content").and_then(|c| c.as_str())
                    && (id as usize) < v.vocab_size
                    && added_seen.insert(c)
                {
                    added_all.push(t);
                }
            }
        }
        for &m in &order {
            let Some(v) = &vocabs[m] else { continue };
            let own_added: HashSet<&str> = v
                .added
                .iter()
                .filter_map(|t| t.get("content").and_then(|c| c.as_str()))
                .collect();
            let mut plain: Vec<(&String, &u32)> = v
                .ids
                .iter()
                .filter(|(t, id)| {
                    (**id as usize) < v.vocab_size
                        && !own_added.contains(t.as_str())
                        && !added_seen.contains(t.as_str())
                })
                .collect();
            plain.sort_by_key(|(_, id)| **id);
            for (t, _) in plain {
                add_token(&mut out_json, &mut ids, t, None);
            }
        }
        for t in added_all {
            if let Some(c) = t.get("content").and_then(|c| c.as_str()) {
                add_token(&mut out_json, &mut ids, c, Some(t));
            }
        }
    }
    for (tok, _) in &tcfg.tokens {
        add_token(&mut out_json, &mut ids, tok, None);
    }
    let vocab_len = ids.values().map(|i| *i as usize + 1).max().unwrap_or(0);
    let rows = match tcfg.pad_to_multiple_of {
        Some(p) => vocab_len.div_ceil(p) * p,
        None => vocab_len,
    };
    let mut by_id: Vec<Option<&String>> = vec![None; vocab_len];
    for (t, i) in &ids {
        by_id[*i as usize] = Some(t);
    }

    // --- permutation
    let model_id = |m: usize, tok: &str| -> Option<u32> {
        let v = vocab_of(m);
        v.ids
            .get(tok)
            .copied()
            .filter(|id| (*id as usize) < v.vocab_size)
    };
    let forced: HashMap<&str, &crate::config::TokenSpec> =
        tcfg.tokens.iter().map(|(t, s)| (t.as_str(), s)).collect();
    let mut explicit = Vec::with_capacity(vocab_len);
    for tok in by_id.iter() {
        let Some(tok) = tok else {
            explicit.push(Some(DefaultRow::Zero));
            continue;
        };
        let spec = forced.get(tok.as_str());
        let d = match spec.and_then(|s| s.source.as_ref()) {
            Some(EmbedSource::Zero) => DefaultRow::Zero,
            Some(EmbedSource::Model(r)) => {
                let m = idx_of(r).ok_or_else(|| {
                    Error::msg(format!(
                        "tokenizer.tokens.{tok}: source {r} is not one of the merged models"
                    ))
                })?;
                match model_id(m, tok) {
                    Some(id) => DefaultRow::Mean(vec![(m, id)]),
                    None => {
                        return Err(Error::msg(format!(
                            "tokenizer.tokens.{tok}: model {r} does not have this token"
                        )));
                    }
                }
            }
            Some(EmbedSource::ModelTokenId { model, token_id }) => {
                let m = idx_of(model).ok_or_else(|| {
                    Error::msg(format!(
                        "tokenizer.tokens.{tok}: source {model} is not one of the merged models"
                    ))
                })?;
                DefaultRow::Mean(vec![(m, *token_id as u32)])
            }
            Some(EmbedSource::ModelToken { model, token }) => {
                let m = idx_of(model).ok_or_else(|| {
                    Error::msg(format!(
                        "tokenizer.tokens.{tok}: source {model} is not one of the merged models"
                    ))
                })?;
                let id = vocab_of(m).ids.get(token).copied().ok_or_else(|| {
                    Error::msg(format!(
                        "tokenizer.tokens.{tok}: model {model} has no token {token:?}"
                    ))
                })?;
                DefaultRow::Mean(vec![(m, id)])
            }
            // chosen per tensor from its inputs
            None => {
                explicit.push(None);
                continue;
            }
        };
        explicit.push(Some(d));
    }
    let mut own = BTreeMap::new();
    let mut present = BTreeMap::new();
    for &m in in_set {
        let v: Vec<Option<u32>> = by_id.iter().map(|t| model_id(m, (*t)?)).collect();
        let o: Vec<Option<u32>> = by_id
            .iter()
            .zip(&v)
            .map(|(t, id)| {
                let t = (*t)?;
                if forced.get(t.as_str()).is_some_and(|s| s.force) {
                    return None;
                }
                *id
            })
            .collect();
        own.insert(m, o);
        present.insert(m, v);
    }

    // --- files
    let mut files = vec![("tokenizer.json".to_string(), pretty(&out_json))];
    for f in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        if source_dir.is_file(f)? {
            let text = source_dir.read_to_string(f)?;
            files.push((f.to_string(), text));
        }
    }
    Ok(TokenizerOutput {
        files,
        permutation: EmbedPermutation {
            vocab_len,
            rows,
            own,
            present,
            explicit,
        },
        warnings,
    })
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON serialises");
    s.push('\n');
    s
}

/// Re-indexes one model's vocabulary-sized tensor (rows along axis 0; a
/// 1-D bias has rows of width 1) to the output vocabulary. `mats` holds the
/// tensor of every input; `defaults` the fallback rows
/// ([`EmbedPermutation::defaults_for`]).
pub fn permute(
    p: &EmbedPermutation,
    defaults: &[DefaultRow],
    model: usize,
    mats: &HashMap<usize, Tensor>,
    name: &str,
) -> Result<Tensor> {
    let missing = || Error::tensor(name, "internal: missing embedding for permutation");
    let own_mat = mats.get(&model).ok_or_else(missing)?;
    let dt = own_mat.dtype;
    let d = own_mat.shape.get(1).copied().unwrap_or(1);
    let row = |m: usize, r: u32| -> Result<&[f32]> {
        let t = mats.get(&m).ok_or_else(missing)?;
        let r = r as usize;
        if t.shape.len() != own_mat.shape.len() || t.shape.get(1) != own_mat.shape.get(1) {
            return Err(Error::tensor(
                name,
                format!(
                    "embedding widths differ: {:?} vs {:?}",
                    t.shape, own_mat.shape
                ),
            ));
        }
        if r >= t.shape[0] {
            return Err(Error::tensor(
                name,
                format!("row {r} is outside an embedding of {} rows", t.shape[0]),
            ));
        }
        Ok(&t.data[r * d..(r + 1) * d])
    };
    let own = &p.own[&model];
    let mut out = vec![0.0f32; p.rows * d];
    for j in 0..p.vocab_len {
        let dst = &mut out[j * d..(j + 1) * d];
        if let Some(r) = own[j] {
            dst.copy_from_slice(row(model, r)?);
            continue;
        }
        match defaults.get(j) {
            None | Some(DefaultRow::Zero | DefaultRow::Missing) => {}
            Some(DefaultRow::Mean(rows)) => {
                if rows.len() == 1 {
                    dst.copy_from_slice(row(rows[0].0, rows[0].1)?);
                } else {
                    let srcs = rows
                        .iter()
                        .map(|(m, r)| row(*m, *r))
                        .collect::<Result<Vec<_>>>()?;
                    let k = rows.len() as f32;
                    // torch: zeros + row + row ... (each add rounded), / k
                    for (c, o) in dst.iter_mut().enumerate() {
                        let s = srcs.iter().fold(0.0f32, |a, s| dt.round(a + s[c]));
                        *o = dt.round(s / k);
                    }
                }
            }
        }
    }
    if p.rows > p.vocab_len && p.vocab_len > 0 {
        let mean: Vec<f32> = (0..d)
            .map(|c| {
                let s: f64 = (0..p.vocab_len).map(|j| out[j * d + c] as f64).sum();
                dt.round((s / p.vocab_len as f64) as f32)
            })
            .collect();
        for j in p.vocab_len..p.rows {
            out[j * d..(j + 1) * d].copy_from_slice(&mean);
        }
    }
    let mut shape = vec![p.rows];
    shape.extend(own_mat.shape.get(1));
    Ok(Tensor::new(shape, out, dt))
}

/// Bundled chat templates (spec §1.8), written for smelt.
pub fn bundled_template(name: &str) -> Option<&'static str> {
    Some(match name {
        "chatml" => concat!(
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
        "alpaca" => concat!(
            "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}",
            "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}",
            "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}",
            "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
        ),
        "llama3" => concat!(
            "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}",
            "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        ),
        "mistral" => concat!(
            "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}",
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
        ),
        "exaone" => concat!(
            "{% for message in messages %}{% if message['role'] == 'system' %}{{ '[|system|]' + message['content'] + '[|endofturn|]\\n' }}",
            "{% elif message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\\n' }}",
            "{% elif message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}{% endif %}",
            "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
        ),
        _ => return None,
    })
}

/// Resolves `chat_template:` to a template text (None: nothing to set).
pub fn resolve_chat_template(cfg: &MergeConfig, models: &[LoadedModel]) -> Result<Option<String>> {
    let Some(ct) = &cfg.chat_template else {
        return Ok(None);
    };
    if ct == "auto" {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for m in models {
            if let Some(t) = model_chat_template(m.location.as_ref()) {
                let t = t.trim().to_string();
                if t.is_empty() {
                    continue;
                }
                match counts.iter_mut().find(|(x, _)| *x == t) {
                    Some(c) => c.1 += 1,
                    None => counts.push((t, 1)),
                }
            }
        }
        let best = counts.iter().map(|c| c.1).max();
        return Ok(best
            .and_then(|b| counts.into_iter().find(|c| c.1 == b))
            .map(|c| c.0));
    }
    if let Some(t) = bundled_template(ct) {
        return Ok(Some(t.to_string()));
    }
    if ct.len() >= 20 && ct.contains('{') {
        return Ok(Some(ct.clone()));
    }
    Err(Error::Config {
        file: cfg.file.clone(),
        field: "chat_template".into(),
        msg: format!(
            "invalid chat template {ct:?}: not auto, a bundled name (alpaca, chatml, exaone, llama3, mistral) or a Jinja template"
        ),
    })
}

fn model_chat_template(dir: &dyn crate::io::ModelLocation) -> Option<String> {
    if dir.exists("chat_template.jinja").unwrap_or(false)
        && let Ok(t) = dir.read_to_string("chat_template.jinja")
    {
        return Some(t);
    }
    if !dir.exists("tokenizer_config.json").unwrap_or(false) {
        return None;
    }
    let tc: Value =
        serde_json::from_str(&dir.read_to_string("tokenizer_config.json").ok()?).ok()?;
    match tc.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
        Value::Object(o) => o
            .get("default")
            .and_then(|d| d.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Applies a chat template to a set of tokenizer files: writes
/// `chat_template.jinja` and drops inline templates from tokenizer_config.json.
pub fn apply_chat_template(files: &mut Vec<(String, String)>, template: &str) {
    files.retain(|(n, _)| n != "chat_template.jinja" && n != "chat_template.json");
    for (n, text) in files.iter_mut() {
        if n == "tokenizer_config.json"
            && let Ok(mut v) = serde_json::from_str::<Value>(text)
            && let Some(o) = v.as_object_mut()
            && o.remove("chat_template").is_some()
        {
            *text = pretty(&v);
        }
    }
    files.push(("chat_template.jinja".into(), template.to_string()));
}
