//! PEFT LoRA adapters applied at read time.
//!
//! mergekit lets a model reference be `base+adapter`: it loads the base model
//! in float16, wraps it with `PeftModel.from_pretrained(...)` and calls
//! `merge_and_unload()` before merging. smelt instead reads the adapter once
//! (header and `adapter_config.json` only) and adds each delta to a base
//! tensor when that tensor is read: [`LoraAdapter::apply`].
//!
//! # What is applied
//!
//! * **Linear LoRA** (`<module>.lora_A.weight` `[r, in]`,
//!   `<module>.lora_B.weight` `[out, r]`): `W += scale · (B @ A)`, on the base
//!   tensor `<module>.weight` of shape `[out, in]`. With `fan_in_fan_out`
//!   (GPT-2 style `Conv1D` weights stored `[in, out]`) the delta is
//!   transposed: `W += scale · (B @ A)ᵀ`.
//! * **Embedding LoRA** (`<module>.lora_embedding_A` `[r, vocab]`,
//!   `<module>.lora_embedding_B` `[hidden, r]`, a trailing `.weight` is also
//!   accepted): `W += scale · (B @ A)ᵀ` on `<module>.weight` `[vocab, hidden]`
//!   (always transposed, whatever `fan_in_fan_out` says, as in PEFT).
//! * **LoRA bias** (`<module>.lora_B.bias` `[out]`, PEFT `lora_bias=True`):
//!   `b += scale · lora_B.bias` on `<module>.bias` (PEFT scales it too).
//! * **Full replacements** — `modules_to_save` (saved as
//!   `base_model.model.<module>.<param>`, e.g. `lm_head.weight`) and, with
//!   `bias: "all"` / `"lora_only"`, trained `<module>.bias` tensors — replace
//!   the base tensor outright (rounded to the base dtype), as
//!   `merge_and_unload` does. A replacement must have the base tensor's shape.
//!
//! Keys may carry the `base_model.model.` prefix PEFT writes, or not. Any
//! other tensor in the adapter is an error at [`LoraAdapter::open`], so an
//! adapter smelt does not understand is never half-applied.
//!
//! # Scaling
//!
//! `scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`,
//! computed in f64 and used as f32. `r` and `lora_alpha` are per module:
//! `rank_pattern` and `alpha_pattern` are looked up independently (as PEFT
//! ≥ 0.14 does). A pattern key `k` matches module name `m` (the name without
//! `base_model.model.`, e.g. `model.layers.0.self_attn.q_proj`) when `m == k`
//! or `m` ends with `.k` — PEFT's `re.match(rf"(.*\.)?({k})$", m)` with `k`
//! taken literally. The first matching key in file order wins, as in PEFT.
//! Keys containing regex syntax other than `.` (`\ ^ $ * + ? ( ) [ ] { } |`)
//! are rejected at open rather than mis-matched. The rank found this way
//! must equal the rank of the stored `lora_A`/`lora_B`, which catches a
//! pattern smelt resolved differently from PEFT.
//!
//! # Arithmetic
//!
//! The delta is computed in f32 (`B @ A` summed over the rank in order, then
//! multiplied by `scale`), added to the base value and rounded **once** to
//! the base tensor's dtype. mergekit merges in float16 (rounding `B @ A`,
//! the scaled delta and the sum separately), so for bf16/f16 bases results
//! can differ from mergekit's in the last bit.
//!
//! # Not supported (errors at open)
//!
//! `adapter_model.bin`, non-LoRA PEFT types (`peft_type` other than `LORA`),
//! DoRA (`use_dora` / `lora_magnitude_vector`), `layer_replication`,
//! `target_parameters`, activated LoRA (`alora_invocation_tokens`),
//! convolution LoRA (non-2-D `lora_A`/`lora_B`), trainable-token adapters and
//! regex keys in `rank_pattern`/`alpha_pattern`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::dtype::Rounding;
use crate::error::{Error, Result};
use crate::io::safetensors::{ModelTensors, TensorLoc, read_header};
use crate::io::source::{ByteSource, LocalFile};
use crate::tensor::Tensor;

/// The prefix PEFT puts before module names in saved adapters.
const PEFT_PREFIX: &str = "base_model.model.";

/// Characters that make a `rank_pattern`/`alpha_pattern` key a regex smelt
/// cannot match literally.
const REGEX_CHARS: &[char] = &[
    '\\', '^', '$', '*', '+', '?', '(', ')', '[', ']', '{', '}', '|',
];

/// The parts of `adapter_config.json` smelt uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    /// Module-name pattern → rank, in file order.
    pub rank_pattern: Vec<(String, usize)>,
    /// Module-name pattern → alpha, in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    /// As written (a list of names or a regex string); informational only —
    /// what is applied is derived from the tensors present.
    pub target_modules: Value,
    /// Module names whose full weights the adapter saves.
    pub modules_to_save: Vec<String>,
    /// PEFT `bias`: `"none"`, `"all"` or `"lora_only"`.
    pub bias: String,
}

impl LoraConfig {
    /// Parses `adapter_config.json` text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<LoraConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(file, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::format(file, "not a JSON object"))?;
        let bad = |msg: String| Error::format(file, msg);

        if let Some(t) = obj.get("peft_type").and_then(Value::as_str)
            && !t.eq_ignore_ascii_case("lora")
        {
            return Err(bad(format!(
                "peft_type {t:?} is not supported: only LoRA adapters can be applied"
            )));
        }
        if obj.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                "DoRA adapters (use_dora: true) are not supported yet".into()
            ));
        }
        for k in [
            "layer_replication",
            "target_parameters",
            "alora_invocation_tokens",
            "trainable_token_indices",
        ] {
            let nonempty = match obj.get(k) {
                None | Some(Value::Null) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if nonempty {
                return Err(bad(format!("`{k}` adapters are not supported yet")));
            }
        }

        let r = match obj.get("r") {
            None | Some(Value::Null) => 8,
            Some(x) => positive_int(x)
                .ok_or_else(|| bad(format!("`r` must be a positive integer, got {x}")))?,
        };
        let lora_alpha = match obj.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| bad(format!("`lora_alpha` must be a number, got {x}")))?,
        };
        let flag = |k: &str| -> Result<bool> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(bad(format!("`{k}` must be true or false, got {x}"))),
            }
        };
        let use_rslora = flag("use_rslora")?;
        let fan_in_fan_out = flag("fan_in_fan_out")?;
        let empty = Map::new();
        let pattern = |k: &str| -> Result<&Map<String, Value>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(&empty),
                Some(Value::Object(m)) => {
                    if let Some(key) = m.keys().find(|key| key.contains(REGEX_CHARS)) {
                        return Err(bad(format!(
                            "`{k}` key {key:?} is a regular expression; smelt matches \
                             pattern keys literally (as a dotted suffix of the module name)"
                        )));
                    }
                    Ok(m)
                }
                Some(x) => Err(bad(format!("`{k}` must be an object, got {x}"))),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .iter()
            .map(|(k, v)| {
                positive_int(v).map(|r| (k.clone(), r)).ok_or_else(|| {
                    bad(format!(
                        "rank_pattern[{k:?}] must be a positive integer, got {v}"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let alpha_pattern = pattern("alpha_pattern")?
            .iter()
            .map(|(k, v)| {
                v.as_f64()
                    .map(|a| (k.clone(), a))
                    .ok_or_else(|| bad(format!("alpha_pattern[{k:?}] must be a number, got {v}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let modules_to_save = match obj.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("`modules_to_save` must be a list of module names".into()))?,
            Some(x) => return Err(bad(format!("`modules_to_save` must be a list, got {x}"))),
        };
        let bias = match obj.get("bias") {
            None | Some(Value::Null) => "none".to_string(),
            Some(Value::String(s)) if ["none", "all", "lora_only"].contains(&s.as_str()) => {
                s.clone()
            }
            Some(x) => {
                return Err(bad(format!(
                    "`bias` must be \"none\", \"all\" or \"lora_only\", got {x}"
                )));
            }
        };
        Ok(LoraConfig {
            r,
            lora_alpha,
            use_rslora,
            fan_in_fan_out,
            rank_pattern,
            alpha_pattern,
            target_modules: obj.get("target_modules").cloned().unwrap_or(Value::Null),
            modules_to_save,
            bias,
        })
    }

    /// The rank and alpha PEFT gives `module` (see the module docs).
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.r, |(_, r)| *r);
        let a = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(self.lora_alpha, |(_, a)| *a);
        (r, a)
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self, module: &str) -> f32 {
        let (r, alpha) = self.rank_alpha(module);
        let s = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        s as f32
    }
}

fn positive_int(v: &Value) -> Option<usize> {
    v.as_u64()
        .or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        })
        .filter(|&n| n > 0)
        .map(|n| n as usize)
}

/// Whether pattern key `key` selects `module`: `module == key` or `module`
/// ends with `.key` (PEFT's `(.*\.)?(key)$`, with `key` literal).
pub fn pattern_matches(key: &str, module: &str) -> bool {
    module == key
        || module
            .strip_suffix(key)
            .is_some_and(|head| head.ends_with('.'))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Linear,
    Embedding,
}

/// One LoRA-adapted module's low-rank pair.
#[derive(Debug, Clone)]
struct LowRank {
    module: String,
    kind: Kind,
    a: String,
    b: String,
    scale: f32,
}

/// A PEFT LoRA adapter, opened (headers and config only).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    dir: PathBuf,
    config: LoraConfig,
    tensors: ModelTensors,
    /// Base `<module>.weight` → its low-rank pair.
    weights: BTreeMap<String, LowRank>,
    /// Base `<module>.bias` → (adapter key of `lora_B.bias`, scale).
    biases: BTreeMap<String, (String, f32)>,
    /// Base tensor → adapter key of its full replacement.
    replacements: BTreeMap<String, String>,
}

/// Partial collection of one module's LoRA keys while scanning the header.
#[derive(Default)]
struct Parts {
    a: Option<String>,
    b: Option<String>,
    emb_a: Option<String>,
    emb_b: Option<String>,
    bias: Option<String>,
}

impl LoraAdapter {
    /// Opens a PEFT adapter directory: `adapter_config.json` and
    /// `adapter_model.safetensors`. Reads no tensor data; validates that
    /// every LoRA pair is complete, 2-D, and of the configured rank.
    pub fn open(dir: &Path) -> Result<LoraAdapter> {
        let cfg_path = dir.join("adapter_config.json");
        let st_path = dir.join("adapter_model.safetensors");
        if !st_path.exists() {
            if dir.join("adapter_model.bin").exists() {
                return Err(Error::format(
                    dir.display(),
                    "PyTorch adapter_model.bin adapters are not supported yet; \
                     convert the adapter to adapter_model.safetensors",
                ));
            }
            return Err(Error::format(
                dir.display(),
                "not a LoRA adapter: no adapter_model.safetensors",
            ));
        }
        if !cfg_path.exists() {
            return Err(Error::format(
                dir.display(),
                "not a LoRA adapter: no adapter_config.json",
            ));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config = LoraConfig::parse(&text, &cfg_path.display().to_string())?;
        let src: Arc<dyn ByteSource> = Arc::new(LocalFile::open(&st_path)?);
        let header = read_header(src.as_ref(), 0)?;
        let tensors = ModelTensors {
            label: format!("LoRA adapter {}", dir.display()),
            shards: vec![src],
            tensors: header,
            lora: None,
        };
        let file = st_path.display().to_string();
        let bad = |key: &str, msg: String| Error::format(&file, format!("tensor {key}: {msg}"));

        let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
        let mut replacements = BTreeMap::new();
        for key in tensors.tensors.keys() {
            let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
            let lora = |suffix: &str| name.strip_suffix(suffix).map(str::to_string);
            if let Some(m) = lora(".lora_A.weight") {
                modules.entry(m).or_default().a = Some(key.clone());
            } else if let Some(m) = lora(".lora_B.weight") {
                modules.entry(m).or_default().b = Some(key.clone());
            } else if let Some(m) = lora(".lora_B.bias") {
                modules.entry(m).or_default().bias = Some(key.clone());
            } else if let Some(m) =
                lora(".lora_embedding_A").or_else(|| lora(".lora_embedding_A.weight"))
            {
                modules.entry(m).or_default().emb_a = Some(key.clone());
            } else if let Some(m) =
                lora(".lora_embedding_B").or_else(|| lora(".lora_embedding_B.weight"))
            {
                modules.entry(m).or_default().emb_b = Some(key.clone());
            } else if name.contains("lora_magnitude_vector") {
                return Err(bad(key, "DoRA adapters are not supported yet".into()));
            } else if name.contains("lora_") || name.contains("trainable_tokens") {
                return Err(bad(
                    key,
                    "not a LoRA tensor smelt knows how to apply (expected \
                     lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A/B)"
                        .into(),
                ));
            } else {
                let module = name.rsplit_once('.').map_or("", |(m, _)| m);
                let saved = config
                    .modules_to_save
                    .iter()
                    .any(|s| pattern_matches(s, module));
                let trained_bias = name.ends_with(".bias") && config.bias != "none";
                if !(saved || trained_bias) {
                    return Err(bad(
                        key,
                        "neither a LoRA weight nor part of a module in `modules_to_save`; \
                         smelt does not know how to apply it"
                            .into(),
                    ));
                }
                replacements.insert(name.to_string(), key.clone());
            }
        }

        let shape = |k: &str| -> &TensorLoc { &tensors.tensors[k] };
        let mut weights = BTreeMap::new();
        let mut biases = BTreeMap::new();
        for (module, p) in modules {
            let (kind, a, b) = match (p.a, p.b, p.emb_a, p.emb_b) {
                (Some(a), Some(b), None, None) => (Kind::Linear, a, b),
                (None, None, Some(a), Some(b)) => (Kind::Embedding, a, b),
                (a, b, ea, eb) => {
                    let have: Vec<String> = [a, b, ea, eb].into_iter().flatten().collect();
                    if have.is_empty() {
                        // Only a lora_B.bias: reported below.
                        return Err(bad(
                            p.bias.as_deref().unwrap_or(&module),
                            "a LoRA bias without lora_A/lora_B weights".into(),
                        ));
                    }
                    return Err(bad(
                        &have[0],
                        format!(
                            "module {module} has an incomplete LoRA pair (found {})",
                            have.join(", ")
                        ),
                    ));
                }
            };
            let (sa, sb) = (&shape(&a).shape, &shape(&b).shape);
            if sa.len() != 2 || sb.len() != 2 {
                return Err(bad(
                    &a,
                    format!(
                        "only 2-D (Linear/Embedding) LoRA is supported; lora_A is {sa:?}, lora_B is {sb:?}"
                    ),
                ));
            }
            if sa[0] != sb[1] {
                return Err(bad(
                    &a,
                    format!("lora_A {sa:?} and lora_B {sb:?} disagree on the rank"),
                ));
            }
            let (rank, _) = config.rank_alpha(&module);
            if sa[0] != rank {
                return Err(bad(
                    &a,
                    format!(
                        "has rank {} but adapter_config.json gives module {module} rank {rank} \
                         (r / rank_pattern)",
                        sa[0]
                    ),
                ));
            }
            let scale = config.scale(&module);
            if let Some(bk) = p.bias {
                let bs = &shape(&bk).shape;
                if kind != Kind::Linear || bs.as_slice() != [sb[0]] {
                    return Err(bad(
                        &bk,
                        format!("LoRA bias of shape {bs:?} does not fit lora_B {sb:?}"),
                    ));
                }
                biases.insert(format!("{module}.bias"), (bk, scale));
            }
            weights.insert(
                format!("{module}.weight"),
                LowRank {
                    module,
                    kind,
                    a,
                    b,
                    scale,
                },
            );
        }
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            config,
            tensors,
            weights,
            biases,
            replacements,
        })
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `adapter_config.json`.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The base tensor names this adapter changes, sorted.
    pub fn targets(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .weights
            .keys()
            .chain(self.biases.keys())
            .chain(self.replacements.keys())
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Whether `name` is one of [`Self::targets`].
    pub fn touches(&self, name: &str) -> bool {
        self.weights.contains_key(name)
            || self.biases.contains_key(name)
            || self.replacements.contains_key(name)
    }

    /// The shape the adapter's delta has for the base tensor `name`, if any
    /// (from headers alone).
    fn delta_shape(&self, name: &str) -> Option<Vec<usize>> {
        let lr = self.weights.get(name)?;
        let sa = &self.tensors.tensors[&lr.a].shape;
        let sb = &self.tensors.tensors[&lr.b].shape;
        Some(if self.transposed(lr) {
            vec![sa[1], sb[0]]
        } else {
            vec![sb[0], sa[1]]
        })
    }

    fn transposed(&self, lr: &LowRank) -> bool {
        lr.kind == Kind::Embedding || self.config.fan_in_fan_out
    }

    /// Checks the base tensor's shape against the adapter without reading
    /// data. `Ok` for tensors the adapter does not touch.
    pub fn check_shape(&self, name: &str, base_shape: &[usize]) -> Result<()> {
        let mismatch = |what: String| {
            Err(Error::tensor(
                name,
                format!(
                    "{what}, but the base tensor has shape {base_shape:?} (LoRA adapter {})",
                    self.dir.display()
                ),
            ))
        };
        if let Some(key) = self.replacements.get(name) {
            let s = &self.tensors.tensors[key].shape;
            if s.as_slice() != base_shape {
                return mismatch(format!(
                    "the adapter's full replacement {key} has shape {s:?}"
                ));
            }
        }
        if let Some(lr) = self.weights.get(name) {
            let want = self.delta_shape(name).expect("weight target");
            if want != base_shape {
                let sa = &self.tensors.tensors[&lr.a].shape;
                let sb = &self.tensors.tensors[&lr.b].shape;
                let how = match (lr.kind, self.config.fan_in_fan_out) {
                    (Kind::Embedding, _) => "(B @ A)ᵀ",
                    (Kind::Linear, true) => "(B @ A)ᵀ (fan_in_fan_out)",
                    (Kind::Linear, false) => "B @ A",
                };
                return mismatch(format!(
                    "LoRA A {sa:?} and B {sb:?} give a delta {how} of shape {want:?}"
                ));
            }
        }
        if let Some((key, _)) = self.biases.get(name) {
            let s = &self.tensors.tensors[key].shape;
            if s.as_slice() != base_shape {
                return mismatch(format!("the LoRA bias {key} has shape {s:?}"));
            }
        }
        Ok(())
    }

    /// Returns `base` with the adapter applied (see the module docs);
    /// tensors the adapter does not touch come back unchanged.
    pub fn apply(&self, name: &str, base: Tensor) -> Result<Tensor> {
        if !self.touches(name) {
            return Ok(base);
        }
        self.check_shape(name, &base.shape)?;
        if !base.dtype.is_float() {
            return Err(Error::tensor(
                name,
                format!(
                    "LoRA adapter {} targets a tensor of integer dtype {}",
                    self.dir.display(),
                    base.dtype.config_name()
                ),
            ));
        }
        let mut out = base;
        let dt = out.dtype;
        if let Some(key) = self.replacements.get(name) {
            let t = self.tensors.read(key)?;
            out.data = t.data.into_iter().map(|v| dt.round(v)).collect();
        }
        if let Some(lr) = self.weights.get(name) {
            let a = self.tensors.read(&lr.a)?;
            let b = self.tensors.read(&lr.b)?;
            let r = a.shape[0];
            // Row p of the delta is Σ_k x[p, k] · yt[k, :].
            let (x, yt) = if self.transposed(lr) {
                (
                    transpose(&a.data, r, a.shape[1]),
                    transpose(&b.data, b.shape[0], r),
                )
            } else {
                (b.data, a.data)
            };
            let cols = out.shape[1];
            crate::with_rounding!(dt, |rd| add_low_rank(
                rd,
                &mut out.data,
                cols,
                &x,
                &yt,
                r,
                lr.scale
            ));
            tracing::trace!(tensor = name, module = lr.module, "applied LoRA delta");
        }
        if let Some((key, scale)) = self.biases.get(name) {
            let bias = self.tensors.read(key)?;
            for (w, d) in out.data.iter_mut().zip(&bias.data) {
                *w = dt.round(*w + d * scale);
            }
        }
        Ok(out)
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// `w[p, q] = round(w[p, q] + scale · Σ_k x[p, k] · yt[k, q])`, with `w`
/// `[rows, cols]`, `x` `[rows, r]`, `yt` `[r, cols]`; parallel over rows.
fn add_low_rank<R: Rounding>(
    rd: R,
    w: &mut [f32],
    cols: usize,
    x: &[f32],
    yt: &[f32],
    r: usize,
    scale: f32,
) {
    use rayon::prelude::*;
    if cols == 0 {
        return;
    }
    w.par_chunks_mut(cols)
        .with_min_len((1 << 14) / cols.max(1) + 1)
        .enumerate()
        .for_each_init(
            || vec![0.0f32; cols],
            |acc, (p, row)| {
                acc.fill(0.0);
                for k in 0..r {
                    let xk = x[p * r + k];
                    for (s, y) in acc.iter_mut().zip(&yt[k * cols..(k + 1) * cols]) {
                        *s += xk * y;
                    }
                }
                for (v, s) in row.iter_mut().zip(acc.iter()) {
                    *v = rd.r(*v + s * scale);
                }
            },
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{DType, bf16_round, encode_par};
    use crate::io::writer::{ShardWriter, SlotSpec};

    type T<'a> = (&'a str, DType, Vec<usize>, Vec<f32>);

    /// Writes `adapter_config.json` and `adapter_model.safetensors`.
    fn write_adapter(dir: &Path, config: &str, tensors: &[T]) {
        std::fs::write(dir.join("adapter_config.json"), config).unwrap();
        let slots: Vec<SlotSpec> = tensors
            .iter()
            .map(|(n, dt, s, _)| SlotSpec {
                name: n.to_string(),
                dtype: *dt,
                shape: s.clone(),
            })
            .collect();
        let w = ShardWriter::create(dir, &[("adapter_model.safetensors".into(), slots)]).unwrap();
        for (i, (_, dt, _, d)) in tensors.iter().enumerate() {
            w.write(0, i, &encode_par(*dt, d)).unwrap();
        }
        w.finish().unwrap();
    }

    fn open(config: &str, tensors: &[T]) -> (tempfile::TempDir, Result<LoraAdapter>) {
        let d = tempfile::tempdir().unwrap();
        write_adapter(d.path(), config, tensors);
        let a = LoraAdapter::open(d.path());
        (d, a)
    }

    const Q: &str = "model.layers.0.self_attn.q_proj";

    /// A = [[1,0,2],[0,1,-1]] (r=2, in=3); B (out=4) = [[1,0],[0,1],[1,1],[2,-1]].
    fn a_b(prefix: &str, module: &str) -> Vec<T<'static>> {
        let a = format!("{prefix}{module}.lora_A.weight").leak();
        let b = format!("{prefix}{module}.lora_B.weight").leak();
        vec![
            (a, DType::F32, vec![2, 3], vec![1., 0., 2., 0., 1., -1.]),
            (
                b,
                DType::F32,
                vec![4, 2],
                vec![1., 0., 0., 1., 1., 1., 2., -1.],
            ),
        ]
    }

    /// B @ A for `a_b`, [4, 3].
    const BA: [f32; 12] = [1., 0., 2., 0., 1., -1., 1., 1., 1., 2., -1., 5.];

    fn base(shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|i| dtype.round(0.5 + 0.25 * i as f32)).collect(),
            dtype,
        )
    }

    #[test]
    fn lora_apply_f32_matches_hand_computed() {
        let (_d, ad) = open(r#"{"r": 2, "lora_alpha": 4}"#, &a_b(PEFT_PREFIX, Q));
        let ad = ad.unwrap();
        let name = format!("{Q}.weight");
        assert_eq!(ad.targets(), vec![name.clone()]);
        let b = base(&[4, 3], DType::F32);
        let out = ad.apply(&name, b.clone()).unwrap();
        // scale = 4 / 2 = 2
        let want: Vec<f32> = b.data.iter().zip(BA).map(|(w, d)| w + 2.0 * d).collect();
        assert_eq!(out.data, want);
        assert_eq!(out.shape, vec![4, 3]);
        assert_eq!(out.dtype, DType::F32);
        // Spelled out for the first row: base 0.5, 0.75, 1.0 + 2·[1, 0, 2].
        assert_eq!(&out.data[..3], &[2.5, 0.75, 5.0]);
    }

    #[test]
    fn lora_apply_bf16_rounds_once() {
        // r = 1, alpha = 1: delta = B @ A exactly.
        let tensors: Vec<T> = vec![
            (
                "base_model.model.m.lora_A.weight",
                DType::F32,
                vec![1, 2],
                vec![1., 1.],
            ),
            (
                "base_model.model.m.lora_B.weight",
                DType::F32,
                vec![2, 1],
                vec![0.75 / 128.0, 1.0 / 512.0],
            ),
        ];
        let (_d, ad) = open(r#"{"r": 1, "lora_alpha": 1}"#, &tensors);
        let ad = ad.unwrap();
        let b = Tensor::new(vec![2, 2], vec![1.0; 4], DType::BF16);
        let out = ad.apply("m.weight", b).unwrap();
        // bf16 ulp at 1 is 1/128: 1 + 0.75/128 rounds up, 1 + 1/512 rounds down.
        assert_eq!(out.data, vec![1.0078125, 1.0078125, 1.0, 1.0]);
        assert_eq!(out.dtype, DType::BF16);
        // Rounded once, from the f32 sum.
        let b2 = base(&[2, 2], DType::BF16);
        let out2 = ad.apply("m.weight", b2.clone()).unwrap();
        let delta = [0.75 / 128.0, 0.75 / 128.0, 1.0 / 512.0, 1.0 / 512.0];
        let want: Vec<f32> = b2
            .data
            .iter()
            .zip(delta)
            .map(|(w, d)| bf16_round(w + d))
            .collect();
        assert_eq!(out2.data, want);
    }

    #[test]
    fn lora_rslora_scaling() {
        let mk = |rs: bool| {
            let tensors: Vec<T> = vec![
                (
                    "m.lora_A.weight",
                    DType::F32,
                    vec![4, 1],
                    vec![1., 1., 1., 1.],
                ),
                ("m.lora_B.weight", DType::F32, vec![1, 4], vec![0.25; 4]),
            ];
            let cfg = format!(r#"{{"r": 4, "lora_alpha": 8, "use_rslora": {rs}}}"#);
            let (_d, ad) = open(&cfg, &tensors);
            let out = ad
                .unwrap()
                .apply("m.weight", Tensor::zeros(&[1, 1], DType::F32));
            out.unwrap().data[0]
        };
        // B @ A = 1; alpha / r = 2; alpha / sqrt(r) = 4.
        assert_eq!(mk(false), 2.0);
        assert_eq!(mk(true), 4.0);
    }

    #[test]
    fn lora_rank_and_alpha_patterns() {
        let mut tensors = a_b(PEFT_PREFIX, Q);
        let v = "model.layers.0.self_attn.v_proj";
        tensors.push((
            format!("{PEFT_PREFIX}{v}.lora_A.weight").leak(),
            DType::F32,
            vec![4, 1],
            vec![1.0; 4],
        ));
        tensors.push((
            format!("{PEFT_PREFIX}{v}.lora_B.weight").leak(),
            DType::F32,
            vec![1, 4],
            vec![1.0; 4],
        ));
        let cfg = r#"{"r": 4, "lora_alpha": 8,
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"layers.0.self_attn.q_proj": 16, "q_proj": 1}}"#;
        let (_d, ad) = open(cfg, &tensors);
        let ad = ad.unwrap();
        assert_eq!(ad.config().rank_alpha(Q), (2, 16.0));
        assert_eq!(ad.config().rank_alpha(v), (4, 8.0));
        // q: 16 / 2 = 8; v: 8 / 4 = 2 with B @ A = 4.
        let q = ad.apply(&format!("{Q}.weight"), Tensor::zeros(&[4, 3], DType::F32));
        let want: Vec<f32> = BA.iter().map(|d| 8.0 * d).collect();
        assert_eq!(q.unwrap().data, want);
        let vo = ad.apply(&format!("{v}.weight"), Tensor::zeros(&[1, 1], DType::F32));
        assert_eq!(vo.unwrap().data, vec![8.0]);

        assert!(pattern_matches("q_proj", Q));
        assert!(pattern_matches(Q, Q));
        assert!(!pattern_matches("proj", Q));
        assert!(!pattern_matches("layers.0", Q));
        assert!(!pattern_matches("model.layers.0.self_attn.q_proj.x", Q));
    }

    #[test]
    fn lora_pattern_errors() {
        let (_d, r) = open(
            r#"{"r": 2, "lora_alpha": 4, "rank_pattern": {"layers\\.[0-3]\\.q_proj": 2}}"#,
            &a_b("", Q),
        );
        assert!(r.unwrap_err().to_string().contains("regular expression"));
        // A pattern rank that disagrees with the stored tensors.
        let (_d, r) = open(
            r#"{"r": 2, "lora_alpha": 4, "rank_pattern": {"q_proj": 8}}"#,
            &a_b("", Q),
        );
        let e = r.unwrap_err().to_string();
        assert!(e.contains("rank 2") && e.contains("rank 8"), "{e}");
    }

    #[test]
    fn lora_fan_in_fan_out_transposes() {
        let (_d, ad) = open(
            r#"{"r": 2, "lora_alpha": 2, "fan_in_fan_out": true}"#,
            &a_b(PEFT_PREFIX, "h.0.attn.c_attn"),
        );
        let ad = ad.unwrap();
        // Base is [in, out] = [3, 4].
        assert!(ad.check_shape("h.0.attn.c_attn.weight", &[4, 3]).is_err());
        let b = base(&[3, 4], DType::F32);
        let out = ad.apply("h.0.attn.c_attn.weight", b.clone()).unwrap();
        let mut want = b.data.clone();
        for i in 0..3 {
            for o in 0..4 {
                want[i * 4 + o] += BA[o * 3 + i];
            }
        }
        assert_eq!(out.data, want);
    }

    #[test]
    fn lora_check_shape_errors() {
        let (_d, ad) = open(r#"{"r": 2, "lora_alpha": 4}"#, &a_b(PEFT_PREFIX, Q));
        let ad = ad.unwrap();
        let name = format!("{Q}.weight");
        ad.check_shape(&name, &[4, 3]).unwrap();
        let e = ad.check_shape(&name, &[3, 4]).unwrap_err().to_string();
        assert!(e.contains(&name), "{e}");
        assert!(e.contains("[2, 3]") && e.contains("[4, 2]"), "{e}");
        assert!(e.contains("[4, 3]") && e.contains("[3, 4]"), "{e}");
        let e = ad
            .apply(&name, Tensor::zeros(&[4, 4], DType::F32))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4, 4]"), "{e}");
        // Untouched tensors pass whatever their shape.
        ad.check_shape("model.norm.weight", &[7]).unwrap();
    }

    #[test]
    fn lora_embeddings() {
        // lora_embedding_A [r=2, vocab=3] (PEFT's keys have no `.weight`),
        // lora_embedding_B [hidden=4, r=2]; delta = (B @ A)ᵀ, [3, 4].
        let tensors: Vec<T> = vec![
            (
                "base_model.model.model.embed_tokens.lora_embedding_A",
                DType::F32,
                vec![2, 3],
                vec![1., 0., 2., 0., 1., -1.],
            ),
            (
                "base_model.model.model.embed_tokens.lora_embedding_B",
                DType::BF16,
                vec![4, 2],
                vec![1., 0., 0., 1., 1., 1., 2., -1.],
            ),
        ];
        let (_d, ad) = open(r#"{"r": 2, "lora_alpha": 1}"#, &tensors);
        let ad = ad.unwrap();
        let name = "model.embed_tokens.weight";
        assert_eq!(ad.targets(), vec![name.to_string()]);
        let e = ad.check_shape(name, &[4, 3]).unwrap_err().to_string();
        assert!(e.contains("[3, 4]") && e.contains("[4, 3]"), "{e}");
        let b = base(&[3, 4], DType::F32);
        let out = ad.apply(name, b.clone()).unwrap();
        let mut want = b.data.clone();
        for v in 0..3 {
            for h in 0..4 {
                want[v * 4 + h] += 0.5 * BA[h * 3 + v];
            }
        }
        assert_eq!(out.data, want);
    }

    #[test]
    fn lora_untouched_tensors_unchanged() {
        // No `base_model.model.` prefix.
        let (_d, ad) = open(r#"{"r": 2, "lora_alpha": 4}"#, &a_b("", Q));
        let ad = ad.unwrap();
        assert_eq!(ad.targets(), vec![format!("{Q}.weight")]);
        for (n, dt) in [
            ("model.layers.0.self_attn.k_proj.weight", DType::BF16),
            (&format!("{Q}.bias"), DType::F32),
            ("lm_head.weight", DType::F16),
        ] {
            let b = base(&[4, 3], dt);
            assert_eq!(ad.apply(n, b.clone()).unwrap(), b);
        }
    }

    #[test]
    fn lora_bias_and_modules_to_save() {
        let mut tensors = a_b(PEFT_PREFIX, Q);
        tensors.push((
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            DType::F32,
            vec![4],
            vec![1., -1., 0.5, 2.],
        ));
        tensors.push((
            "base_model.model.lm_head.weight",
            DType::F32,
            vec![2, 2],
            vec![0.1, 0.2, 0.3, 0.4],
        ));
        let cfg = r#"{"r": 2, "lora_alpha": 4, "lora_bias": true, "modules_to_save": ["lm_head"]}"#;
        let (_d, ad) = open(cfg, &tensors);
        let ad = ad.unwrap();
        assert_eq!(
            ad.targets(),
            vec![
                "lm_head.weight".to_string(),
                format!("{Q}.bias"),
                format!("{Q}.weight")
            ]
        );
        let out = ad
            .apply(
                &format!("{Q}.bias"),
                Tensor::new(vec![4], vec![1.0; 4], DType::F32),
            )
            .unwrap();
        assert_eq!(out.data, vec![3.0, -1.0, 2.0, 5.0]);
        assert!(ad.check_shape(&format!("{Q}.bias"), &[3]).is_err());
        let lm = ad
            .apply("lm_head.weight", Tensor::zeros(&[2, 2], DType::BF16))
            .unwrap();
        assert_eq!(lm.dtype, DType::BF16);
        let want: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4]
            .iter()
            .map(|v| bf16_round(*v))
            .collect();
        assert_eq!(lm.data, want);
        assert!(ad.check_shape("lm_head.weight", &[2, 3]).is_err());

        // Without modules_to_save the full weight is an unknown tensor.
        let (_d, r) = open(r#"{"r": 2, "lora_alpha": 4, "lora_bias": true}"#, &tensors);
        assert!(r.unwrap_err().to_string().contains("lm_head.weight"));
    }

    #[test]
    fn lora_unsupported_adapters() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("adapter_config.json"), "{}").unwrap();
        std::fs::write(d.path().join("adapter_model.bin"), b"x").unwrap();
        let e = LoraAdapter::open(d.path()).unwrap_err().to_string();
        assert!(e.contains("not supported yet"), "{e}");

        let (_d, r) = open(
            r#"{"r": 2, "lora_alpha": 4, "use_dora": true}"#,
            &a_b("", Q),
        );
        assert!(r.unwrap_err().to_string().contains("DoRA"));
        let (_d, r) = open(r#"{"peft_type": "IA3"}"#, &a_b("", Q));
        assert!(r.unwrap_err().to_string().contains("IA3"));
        let mut half = a_b("", Q);
        half.pop();
        let (_d, r) = open(r#"{"r": 2}"#, &half);
        assert!(r.unwrap_err().to_string().contains("incomplete"));
    }

    #[test]
    fn lora_parallel_matches_naive() {
        let (r, out_f, in_f) = (3usize, 37usize, 53usize);
        let a: Vec<f32> = (0..r * in_f)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..out_f * r)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let tensors: Vec<T> = vec![
            ("x.lora_A.weight", DType::F32, vec![r, in_f], a.clone()),
            ("x.lora_B.weight", DType::F32, vec![out_f, r], b.clone()),
        ];
        let (_d, ad) = open(r#"{"r": 3, "lora_alpha": 6}"#, &tensors);
        let ad = ad.unwrap();
        let bt = base(&[out_f, in_f], DType::F16);
        let out = ad.apply("x.weight", bt.clone()).unwrap();
        for o in 0..out_f {
            for i in 0..in_f {
                let mut s = 0.0f32;
                for k in 0..r {
                    s += b[o * r + k] * a[k * in_f + i];
                }
                let w = DType::F16.round(bt.data[o * in_f + i] + 2.0 * s);
                assert_eq!(out.data[o * in_f + i], w, "({o}, {i})");
            }
        }
    }
}
