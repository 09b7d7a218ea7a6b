//! Planning a merge from headers alone (spec §3): which output tensors exist,
//! which input tensors and parameter values feed each, the output shape and
//! dtype of each, the write order, and the shard layout. The plan is plain
//! data (serde), so a coordinator can ship it to workers.

use std::sync::Arc;

use serde_json::Value;

use crate::architecture::{Architecture, WeightInfo};
use crate::config::{MergeBody, MergeConfig, ModelRef, ParamMap};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::writer::SlotSpec;
use crate::methods::{self, BaseUse, MergeMethod, ParamValues, ShapeCtx, ShapePlan};
use crate::model::LoadedModel;
use crate::params;

/// Options that change what is planned.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlanOptions {
    pub allow_crimes: bool,
    /// Shard size limit in bytes (≤ 0 disables sharding).
    pub out_shard_size: i64,
    pub random_seed: u64,
    /// Hugging Face cache to resolve model ids in (besides the standard ones).
    #[serde(default)]
    pub hf_cache: Option<std::path::PathBuf>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            allow_crimes: false,
            out_shard_size: 5_000_000_000,
            random_seed: 0,
            hf_cache: None,
        }
    }
}

/// How an input tensor is obtained from a model's files.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum InputSource {
    /// A tensor stored under this name.
    Tensor(String),
    /// Per-expert tensors fused into the transformers-v5 layout: for each
    /// expert, its parts concatenated along axis 0; experts stacked.
    StackExperts(Vec<Vec<String>>),
}

impl InputSource {
    /// The name used to order writes (the largest name involved).
    pub fn label(&self) -> String {
        match self {
            InputSource::Tensor(n) => n.clone(),
            InputSource::StackExperts(p) => p.iter().flatten().max().cloned().unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskInput {
    /// Index into [`MergePlan::models`].
    pub model: usize,
    pub source: InputSource,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Everything needed to compute one output tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorTask {
    pub name: String,
    pub inputs: Vec<TaskInput>,
    /// Index into `inputs` of the base model's tensor.
    pub base: Option<usize>,
    pub global: ParamValues,
    pub per_model: Vec<ParamValues>,
    pub is_embed: bool,
    pub working_dtype: DType,
    pub out_dtype: DType,
    pub shape: Vec<usize>,
    pub shard: usize,
    pub slot: usize,
    /// Re-index inputs to the merged tokenizer's vocabulary first.
    #[serde(default)]
    pub permute: bool,
    /// With `permute`: each output token's fallback row, chosen from this
    /// tensor's inputs ([`crate::tokenizer::EmbedPermutation::defaults_for`]).
    #[serde(default)]
    pub vocab_defaults: Vec<crate::tokenizer::DefaultRow>,
}

impl TensorTask {
    pub fn out_bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.out_dtype.size() as u64
    }
    /// Rough peak memory of computing this tensor (inputs and a few
    /// temporaries as f32).
    pub fn working_bytes(&self) -> u64 {
        let n: u64 = self.shape.iter().product::<usize>() as u64;
        (self.inputs.len() as u64 * 2 + 3) * n * 4
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannedModel {
    pub reference: ModelRef,
    /// Where its files are: a local directory or a URL (reopen with
    /// [`PlannedModel::open`]).
    pub location: String,
}

impl PlannedModel {
    /// Reopens the model's tensors from its location (headers only), as a
    /// worker does. A LoRA adapter in the reference is not applied here.
    pub fn open(&self) -> crate::Result<crate::io::ModelTensors> {
        let loc = crate::io::open_location(&self.location)?;
        crate::io::ModelTensors::open(loc.as_ref(), &self.reference.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardPlan {
    pub file_name: String,
    /// Indices into [`MergePlan::tensors`], in file order.
    pub tensors: Vec<usize>,
}

/// A complete merge plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergePlan {
    pub method: String,
    pub models: Vec<PlannedModel>,
    /// Output tensors in write order.
    pub tensors: Vec<TensorTask>,
    pub shards: Vec<ShardPlan>,
    /// The output config.json.
    pub out_config: Value,
    /// Index of the model donating config and tokenizer.
    pub donor: usize,
    pub base: Option<usize>,
    pub seed: u64,
    pub architecture: String,
    /// The merged tokenizer, when the configuration asks for one.
    pub tokenizer: Option<crate::tokenizer::TokenizerOutput>,
    /// Chat template to attach to the written tokenizer.
    pub chat_template: Option<String>,
    pub warnings: Vec<String>,
}

impl MergePlan {
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.out_bytes()).sum()
    }

    /// Slot specs of each shard, for the writer.
    pub fn shard_slots(&self) -> Vec<(String, Vec<SlotSpec>)> {
        self.shards
            .iter()
            .map(|s| {
                (
                    s.file_name.clone(),
                    s.tensors
                        .iter()
                        .map(|i| {
                            let t = &self.tensors[*i];
                            SlotSpec {
                                name: t.name.clone(),
                                dtype: t.out_dtype,
                                shape: t.shape.clone(),
                            }
                        })
                        .collect(),
                )
            })
            .collect()
    }

    /// The index file (`None` for a single shard).
    pub fn index_json(&self) -> Option<Value> {
        if self.shards.len() <= 1 {
            return None;
        }
        let mut wm = serde_json::Map::new();
        for s in &self.shards {
            for i in &s.tensors {
                wm.insert(
                    self.tensors[*i].name.clone(),
                    Value::from(s.file_name.clone()),
                );
            }
        }
        Some(serde_json::json!({
            "metadata": {"total_size": self.total_bytes(), "mergekit_version": "0.1.5"},
            "weight_map": Value::Object(wm),
        }))
    }
}

/// One output slice, normalised.
struct PlanSlice<'a> {
    /// (model index, first input layer, per-source parameters)
    sources: Vec<(usize, usize, &'a ParamMap)>,
    base: Option<usize>,
    params: &'a ParamMap,
    len: usize,
}

/// Builds the plan. `models` are the loaded referenced models, in the order
/// of [`MergeConfig::referenced_models`].
pub fn plan_merge(
    cfg: &MergeConfig,
    models: &[LoadedModel],
    opts: &PlanOptions,
) -> Result<MergePlan> {
    let method = methods::get(&cfg.merge_method).ok_or_else(|| Error::Config {
        file: cfg.file.clone(),
        field: "merge_method".into(),
        msg: format!(
            "unknown merge method {:?}; known: {}",
            cfg.merge_method,
            methods::names().join(", ")
        ),
    })?;
    let idx_of = |r: &ModelRef| -> usize {
        models
            .iter()
            .position(|m| &m.reference == r)
            .expect("every referenced model is loaded")
    };
    let mut warnings = cfg.warnings.clone();

    // --- architecture (spec §3.1)
    let arch: Arc<Architecture> = if models.iter().all(|m| m.arch.is_some()) {
        let first = models[0].arch.clone().expect("checked");
        for m in &models[1..] {
            let a = m.arch.as_ref().expect("checked");
            if a.file != first.file {
                if opts.allow_crimes {
                    warnings.push(format!(
                        "mixing architectures {} ({}) and {} ({}) because of --allow-crimes",
                        models[0].reference, first.file, m.reference, a.file
                    ));
                } else {
                    return Err(Error::msg(format!(
                        "models have different architectures: {} is {} but {} is {}; pass --allow-crimes to merge them anyway",
                        models[0].reference,
                        first
                            .architectures
                            .first()
                            .map(String::as_str)
                            .unwrap_or("?"),
                        m.reference,
                        a.architectures.first().map(String::as_str).unwrap_or("?"),
                    )));
                }
            }
        }
        first
    } else {
        let names: Vec<(String, std::collections::BTreeSet<String>)> = models
            .iter()
            .map(|m| {
                (
                    m.reference.to_string(),
                    m.tensors.tensors.keys().cloned().collect(),
                )
            })
            .collect();
        let mut a = Architecture::infer(&names)?;
        // what transformers' config tells about the inferred layout: the
        // layer count key (updated for slices) where it agrees with the
        // tensor names, and vocabulary-sized loose tensors (first
        // dimension = vocab_size: Bloom's word_embeddings, Mamba's
        // embeddings, ...), re-indexed by tokenizer merges
        let cfg0 = &models[0].config;
        let as_usize = |k: &str| cfg0.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        if a.override_num_layers.is_some() && as_usize("num_hidden_layers") == a.override_num_layers
        {
            a.num_layers_config_key = Some("num_hidden_layers".into());
        }
        if let Some(vocab) = as_usize("vocab_size") {
            for w in &mut a.pre_weights {
                if let Some(l) = models[0].tensors.tensors.get(&w.name)
                    && matches!(l.shape.len(), 1 | 2)
                    && l.shape[0] == vocab
                {
                    w.is_embed = true;
                }
            }
        }
        let unknown: Vec<String> = models
            .iter()
            .filter(|m| m.arch.is_none())
            .map(|m| {
                format!(
                    "{} ({})",
                    m.reference,
                    m.config
                        .get("architectures")
                        .map(|a| a.to_string())
                        .unwrap_or_default()
                )
            })
            .collect();
        warnings.push(format!(
            "no architecture definition for {}; inferred {} layers from tensor names",
            unknown.join(", "),
            a.override_num_layers.unwrap_or(0)
        ));
        Arc::new(a)
    };
    let nlayers = |m: usize| arch.num_layers(&models[m].config, &models[m].reference.to_string());

    // --- slices (spec §1.5, §1.6)
    let empty = ParamMap::new();
    let top_base = cfg.base_model.as_ref().map(idx_of);
    let slices: Vec<PlanSlice> = match &cfg.body {
        MergeBody::Models(ms) => {
            let mut sources = Vec::new();
            for m in ms {
                sources.push((idx_of(&m.model), 0usize, &m.parameters));
            }
            if let Some(b) = top_base
                && !sources.iter().any(|s| s.0 == b)
            {
                sources.push((b, 0, &empty));
            }
            let mut len = None;
            for (m, _, _) in &sources {
                let n = nlayers(*m)?;
                match len {
                    None => len = Some(n),
                    Some(l) if l != n => {
                        return Err(Error::msg(format!(
                            "all inputs to a slice must contain the same number of layers: {} has {l}, {} has {n} (use `slices:` to take layer ranges)",
                            models[sources[0].0].reference, models[*m].reference
                        )));
                    }
                    _ => {}
                }
            }
            vec![PlanSlice {
                sources,
                base: top_base,
                params: &empty,
                len: len.unwrap_or(0),
            }]
        }
        MergeBody::Slices(ss) => {
            let mut out = Vec::new();
            for (si, s) in ss.iter().enumerate() {
                let mut sources = Vec::new();
                let mut len = None;
                for (j, src) in s.sources.iter().enumerate() {
                    let m = idx_of(&src.model);
                    let (a, b) = src.layer_range.expect("validated");
                    let n = nlayers(m)?;
                    if b > n {
                        return Err(Error::Config {
                            file: cfg.file.clone(),
                            field: format!("slices[{si}].sources[{j}].layer_range"),
                            msg: format!(
                                "[{a}, {b}] is out of bounds: {} has {n} layers",
                                src.model
                            ),
                        });
                    }
                    match len {
                        None => len = Some(b - a),
                        Some(l) if l != b - a => {
                            return Err(Error::Config {
                                file: cfg.file.clone(),
                                field: format!("slices[{si}].sources[{j}].layer_range"),
                                msg: format!(
                                    "all inputs to a slice must contain the same number of layers ({l} vs {})",
                                    b - a
                                ),
                            });
                        }
                        _ => {}
                    }
                    sources.push((m, a, &src.parameters));
                }
                out.push(PlanSlice {
                    sources,
                    base: s.base_model.as_ref().map(idx_of).or(top_base),
                    params: &s.parameters,
                    len: len.unwrap_or(0),
                });
            }
            out
        }
    };
    if method.base_use() == BaseUse::Required && slices.iter().any(|s| s.base.is_none()) {
        return Err(Error::Config {
            file: cfg.file.clone(),
            field: "base_model".into(),
            msg: format!("merge method {} requires a base_model", method.name()),
        });
    }
    // each slice's inputs against the method's contract (mergekit 0.1.5
    // checks this before planning any tensor)
    for (si, s) in slices.iter().enumerate() {
        let field = match &cfg.body {
            MergeBody::Models(_) => "models".to_string(),
            MergeBody::Slices(_) => format!("slices[{si}].sources"),
        };
        let bad = |msg: String| Error::Config {
            file: cfg.file.clone(),
            field: field.clone(),
            msg,
        };
        let uses_base = method.base_use() != BaseUse::Unused;
        let has_base = uses_base && s.base.is_some_and(|b| s.sources.iter().any(|x| x.0 == b));
        if uses_base && let Some(b) = s.base.filter(|_| !has_base) {
            return Err(bad(format!(
                "base model {} is not among the inputs of this slice (merge method {})",
                models[b].reference,
                method.name()
            )));
        }
        let n = s.sources.len();
        method
            .input_counts()
            .check(n, n - has_base as usize)
            .map_err(|e| bad(format!("merge method {} {e}", method.name())))?;
    }

    // --- output config (spec §3.2)
    let donor = top_base.unwrap_or(0);
    let mut out_config = models[donor].config.clone();
    let out_layers = match &cfg.body {
        MergeBody::Models(_) => nlayers(donor)?,
        MergeBody::Slices(_) => {
            let total: usize = slices.iter().map(|s| s.len).sum();
            match arch.num_layers_config_key.as_deref() {
                Some(key) => set_config_path(&mut out_config, key, Value::from(total)),
                None if arch.override_num_layers.is_some() => warnings.push(
                    "inferred architecture: the output config's layer count is left unchanged"
                        .into(),
                ),
                None => set_config_path(&mut out_config, "num_hidden_layers", Value::from(total)),
            }
            total
        }
    };
    // the dtype named in config.json: out_dtype, else dtype, else the
    // donor's (without a base_model mergekit's donor is whichever model its
    // set iterates first, arbitrary when the models' dtypes differ: smelt
    // takes the first listed)
    let named = cfg.out_dtype.or(cfg.dtype);
    if let Some(dt) = named
        && let Some(o) = out_config.as_object_mut()
    {
        o.remove("torch_dtype");
        o.insert("dtype".into(), Value::from(dt.config_name()));
    }

    // --- tokenizer (spec §3.5)
    let tokenizer = match &cfg.tokenizer {
        Some(t) => {
            let all: Vec<usize> = (0..models.len()).collect();
            let out = crate::tokenizer::build(t, models, &arch, donor, &all)?;
            warnings.extend(out.warnings.iter().cloned());
            set_config_path(
                &mut out_config,
                arch.vocab_size_key(),
                Value::from(out.permutation.rows),
            );
            Some(out)
        }
        None => None,
    };
    let chat_template = crate::tokenizer::resolve_chat_template(cfg, models)?;

    // --- tensors (spec §3.3)
    let mut planner = TensorPlanner {
        cfg,
        models,
        method: method.as_ref(),
        permutation: tokenizer.as_ref().map(|t| &t.permutation),
        tasks: Vec::new(),
        warnings: Vec::new(),
        errors: Vec::new(),
    };
    // pre-layer weights from the first slice, post-layer from the last, t = 0;
    // input names are instantiated with each source model's own layer count
    let edge = |_: &PlanSlice, post: bool, n: usize| {
        if post {
            arch.post_weights(n)
        } else {
            arch.pre_weights(n)
        }
    };
    plan_edge(&mut planner, &slices[0], false, out_layers, &edge, &nlayers)?;
    let mut out_layer = 0usize;
    for s in &slices {
        for k in 0..s.len {
            let t = if s.len > 1 {
                k as f64 / (s.len - 1) as f64
            } else {
                1.0
            };
            let outs = arch.layer_weights(out_layer, out_layers);
            let per_src: Vec<Vec<WeightInfo>> = s
                .sources
                .iter()
                .map(|src| Ok(arch.layer_weights(src.1 + k, nlayers(src.0)?)))
                .collect::<Result<_>>()?;
            for (wi, w) in outs.iter().enumerate() {
                let ins: Vec<(usize, WeightInfo)> = s
                    .sources
                    .iter()
                    .zip(&per_src)
                    .map(|(src, ws)| (src.0, ws[wi].clone()))
                    .collect();
                planner.try_plan(w, s, &ins, t);
            }
            out_layer += 1;
        }
    }
    // post-layer weights (final norm, lm_head): the last slice's sources,
    // as many as the first slice has (mergekit zips the first slice's
    // count with the last slice's models, parameters from the last slice)
    let last = &slices[slices.len() - 1];
    let post = PlanSlice {
        sources: last.sources[..last.sources.len().min(slices[0].sources.len())].to_vec(),
        base: last.base,
        params: last.params,
        len: last.len,
    };
    plan_edge(&mut planner, &post, true, out_layers, &edge, &nlayers)?;
    warnings.extend(planner.warnings);
    if !planner.errors.is_empty() {
        return Err(Error::Many(planner.errors));
    }
    let tasks = planner.tasks;
    if tasks.is_empty() {
        return Err(Error::msg("the merge produces no tensors"));
    }

    // --- write order (spec §3.6) and shards (§5.3)
    let mut order: Vec<(String, usize)> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            // permuted embeddings carry mergekit's empty group label: first
            let label = if t.permute {
                String::new()
            } else {
                t.inputs
                    .iter()
                    .map(|x| x.source.label())
                    .max()
                    .unwrap_or_default()
            };
            (label, i)
        })
        .collect();
    order.sort();
    let mut slots: Vec<Option<TensorTask>> = tasks.into_iter().map(Some).collect();
    let mut sorted: Vec<TensorTask> = order
        .iter()
        .map(|(_, i)| slots[*i].take().expect("each task once"))
        .collect();
    let mut groups: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0u64;
    for (i, t) in sorted.iter().enumerate() {
        let b = t.out_bytes();
        let g = groups.last_mut().expect("non-empty");
        if !g.is_empty() && opts.out_shard_size > 0 && cur + b > opts.out_shard_size as u64 {
            groups.push(vec![i]);
            cur = b;
        } else {
            g.push(i);
            cur += b;
        }
    }
    let n = groups.len();
    let shards: Vec<ShardPlan> = groups
        .into_iter()
        .enumerate()
        .map(|(k, g)| ShardPlan {
            file_name: if n == 1 {
                "model.safetensors".into()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            },
            tensors: g,
        })
        .collect();
    for (k, s) in shards.iter().enumerate() {
        for (slot, i) in s.tensors.iter().enumerate() {
            sorted[*i].shard = k;
            sorted[*i].slot = slot;
        }
    }
    Ok(MergePlan {
        method: method.name().to_string(),
        models: models
            .iter()
            .map(|m| PlannedModel {
                reference: m.reference.clone(),
                location: m.location.display(),
            })
            .collect(),
        tensors: sorted,
        shards,
        out_config,
        donor,
        base: top_base,
        seed: opts.random_seed,
        architecture: arch.file.clone(),
        tokenizer,
        chat_template,
        warnings,
    })
}

fn plan_edge(
    planner: &mut TensorPlanner,
    slice: &PlanSlice,
    post: bool,
    out_layers: usize,
    edge: &dyn Fn(&PlanSlice, bool, usize) -> Vec<WeightInfo>,
    nlayers: &dyn Fn(usize) -> Result<usize>,
) -> Result<()> {
    let outs = edge(slice, post, out_layers);
    let per_src: Vec<Vec<WeightInfo>> = slice
        .sources
        .iter()
        .map(|s| Ok(edge(slice, post, nlayers(s.0)?)))
        .collect::<Result<_>>()?;
    for (wi, w) in outs.iter().enumerate() {
        let ins: Vec<(usize, WeightInfo)> = slice
            .sources
            .iter()
            .zip(&per_src)
            .map(|(s, ws)| (s.0, ws[wi].clone()))
            .collect();
        planner.try_plan(w, slice, &ins, 0.0);
    }
    Ok(())
}

fn set_config_path(cfg: &mut Value, path: &str, v: Value) {
    let mut cur = cfg;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        if cur.get(*p).is_none() {
            cur[*p] = Value::Object(Default::default());
        }
        cur = &mut cur[*p];
    }
    cur[parts[parts.len() - 1]] = v;
}

struct TensorPlanner<'a> {
    cfg: &'a MergeConfig,
    models: &'a [LoadedModel],
    method: &'a dyn MergeMethod,
    permutation: Option<&'a crate::tokenizer::EmbedPermutation>,
    tasks: Vec<TensorTask>,
    warnings: Vec<String>,
    /// Every tensor's planning error: all are reported, not just the first.
    errors: Vec<Error>,
}

impl TensorPlanner<'_> {
    /// Plans one tensor, recording (not returning) its error.
    fn try_plan(
        &mut self,
        out: &WeightInfo,
        slice: &PlanSlice,
        ins: &[(usize, WeightInfo)],
        t: f64,
    ) {
        if let Err(e) = self.plan_tensor(out, slice, ins, t) {
            let msg = e.to_string();
            if !self.errors.iter().any(|x| x.to_string() == msg) {
                self.errors.push(e);
            }
        }
    }

    /// Plans one output tensor `out` from `(model, input weight)` pairs.
    fn plan_tensor(
        &mut self,
        out: &WeightInfo,
        slice: &PlanSlice,
        ins: &[(usize, WeightInfo)],
        t: f64,
    ) -> Result<()> {
        // optional weights: skipped when no model has the name or an alias
        if out.optional {
            let any = ins.iter().any(|(m, w)| {
                let mt = &self.models[*m].tensors;
                mt.contains(&w.name)
                    || w.aliases.iter().any(|a| mt.contains(a))
                    || synthesize(&w.name, mt).is_some()
            });
            if !any {
                return Ok(());
            }
        }
        let mut inputs: Vec<TaskInput> = Vec::new();
        let mut per_model: Vec<ParamValues> = Vec::new();
        let mut seen: Vec<usize> = Vec::new();
        let base_model = slice.base;
        let global_levels: Vec<&ParamMap> = vec![
            slice.params,
            &self.cfg.module_parameters,
            &self.cfg.parameters,
        ];
        for (m, w) in ins {
            if seen.contains(m) {
                continue;
            }
            seen.push(*m);
            let model = &self.models[*m];
            let mt = &model.tensors;
            let found = std::iter::once(&w.name)
                .chain(&w.aliases)
                .chain(&w.tied_names)
                .find(|n| mt.contains(n))
                .map(|n| InputSource::Tensor(n.clone()))
                .or_else(|| synthesize(&w.name, mt));
            let Some(source) = found else {
                if w.optional {
                    continue;
                }
                return Err(Error::tensor(
                    &w.name,
                    format!("required but not present in model {}", model.reference),
                ));
            };
            let (dtype, shape) = source_meta(&source, mt, &w.name)?;
            // per-model parameters (spec §1.3): source → slice → module → top
            let src_params = slice.sources.iter().find(|s| s.0 == *m).map(|s| s.2);
            let mut levels: Vec<&ParamMap> = Vec::new();
            if let Some(p) = src_params {
                levels.push(p);
            }
            levels.extend(global_levels.iter().copied());
            let mut pv = ParamValues::new();
            for spec in self.method.model_params() {
                let v =
                    params::resolve(&levels, spec.name, spec.kind, &w.name, t).map_err(|e| {
                        Error::tensor(&out.name, format!("{e} (model {})", model.reference))
                    })?;
                match v.or(spec.default) {
                    Some(v) => {
                        pv.insert(spec.name.to_string(), v);
                    }
                    None if spec.required && Some(*m) != base_model => {
                        return Err(Error::msg(format!(
                            "missing required parameter {} for model {} (tensor {})",
                            spec.name, model.reference, w.name
                        )));
                    }
                    None if spec.required && self.method.base_use() == BaseUse::Unused => {
                        return Err(Error::msg(format!(
                            "{}: base_model {} takes part in the merge but has no `{}`; list it under models with a {}, or drop base_model",
                            self.method.name(),
                            model.reference,
                            spec.name,
                            spec.name
                        )));
                    }
                    None => {}
                }
            }
            inputs.push(TaskInput {
                model: *m,
                source,
                dtype,
                shape,
            });
            per_model.push(pv);
        }
        let mut global = ParamValues::new();
        for spec in self.method.global_params() {
            let v = params::resolve(&global_levels, spec.name, spec.kind, &out.name, t)
                .map_err(|e| Error::tensor(&out.name, e))?;
            match v.or(spec.default) {
                Some(v) => {
                    global.insert(spec.name.to_string(), v);
                }
                None if spec.required => {
                    return Err(Error::msg(format!(
                        "missing required parameter {} for tensor {} (merge method {})",
                        spec.name,
                        out.name,
                        self.method.name()
                    )));
                }
                None => {}
            }
        }
        if inputs.is_empty() {
            return Err(Error::tensor(&out.name, "no model provides this tensor"));
        }
        let mut base = base_model.and_then(|b| inputs.iter().position(|i| i.model == b));
        let permute = out.is_embed && self.permutation.is_some();
        let mut vocab_defaults = Vec::new();
        let shapes: Vec<Vec<usize>> = match self.permutation.filter(|_| permute) {
            Some(p) => {
                // vocabulary-sized: rows of any width (a 1-D bias: width 1)
                let d = inputs[0].shape.get(1).copied();
                for i in &inputs {
                    if i.shape.is_empty() || i.shape.len() > 2 || i.shape.get(1).copied() != d {
                        return Err(Error::tensor(
                            &out.name,
                            format!(
                                "tokenizer merge needs vocabulary-sized tensors of equal row width; found {:?} and {:?}",
                                inputs[0].shape, i.shape
                            ),
                        ));
                    }
                }
                let models: Vec<usize> = inputs.iter().map(|i| i.model).collect();
                let (rows, warns) = p
                    .defaults_for(&models, base_model, |m| {
                        self.models[m].reference.to_string()
                    })
                    .map_err(|e| Error::tensor(&out.name, e))?;
                for w in warns {
                    if !self.warnings.contains(&w) {
                        self.warnings.push(w);
                    }
                }
                vocab_defaults = rows;
                let mut shape = vec![p.rows];
                shape.extend(d);
                inputs.iter().map(|_| shape.clone()).collect()
            }
            None => inputs.iter().map(|i| i.shape.clone()).collect(),
        };
        let decision = self.method.plan_shapes(&ShapeCtx {
            name: &out.name,
            shapes: &shapes,
            base,
            is_embed: out.is_embed,
            optional: out.optional,
        })?;
        let (shape, keep, warns) = match decision {
            ShapePlan::Skip(why) => {
                self.warnings.push(why);
                return Ok(());
            }
            ShapePlan::Output {
                shape,
                keep,
                warnings,
            } => (shape, keep, warnings),
        };
        self.warnings.extend(warns);
        if keep.iter().any(|k| !k) {
            let mut ni = Vec::new();
            let mut np = Vec::new();
            for ((i, p), k) in inputs.into_iter().zip(per_model).zip(&keep) {
                if *k {
                    ni.push(i);
                    np.push(p);
                }
            }
            inputs = ni;
            per_model = np;
            base = base_model.and_then(|b| inputs.iter().position(|i| i.model == b));
        }
        let labels: Vec<String> = inputs
            .iter()
            .map(|i| self.models[i.model].reference.to_string())
            .collect();
        let is_base: Vec<bool> = inputs.iter().map(|i| Some(i.model) == base_model).collect();
        let numel: usize = shape.iter().product();
        let warns = self
            .method
            .validate(&crate::methods::ValidateCtx {
                global: &global,
                per_model: &per_model,
                is_base: &is_base,
                labels: &labels,
                numel,
            })
            .map_err(|e| Error::tensor(&out.name, e))?;
        for w in warns {
            if !self.warnings.contains(&w) {
                self.warnings.push(w);
            }
        }
        let force = out
            .force_dtype
            .as_deref()
            .map(|s| {
                DType::from_config_name(s).ok_or_else(|| {
                    Error::tensor(
                        &out.name,
                        format!("architecture force_dtype {s:?} is unknown"),
                    )
                })
            })
            .transpose()?;
        // no dtype given: the inputs' common type, as torch promotes them
        // (mergekit 0.1.5's `promoted_dtype`: bf16 with f16 or f32 → f32)
        let working = force.or(self.cfg.dtype).unwrap_or_else(|| {
            inputs[1..]
                .iter()
                .fold(inputs[0].dtype, |a, i| a.promote(i.dtype))
        });
        if !working.is_float() && self.method.name() != "passthrough" {
            return Err(Error::tensor(
                &out.name,
                format!("cannot merge {working} tensors with {}", self.method.name()),
            ));
        }
        let out_dtype = force
            .or(self.cfg.out_dtype)
            .unwrap_or_else(|| self.method.output_dtype(working));
        self.tasks.push(TensorTask {
            name: out.name.clone(),
            inputs,
            base,
            global,
            per_model,
            is_embed: out.is_embed,
            working_dtype: working,
            out_dtype,
            shape,
            shard: 0,
            slot: 0,
            permute,
            vocab_defaults,
        });
        Ok(())
    }
}

/// Dtype and shape of an input source, from headers.
fn source_meta(
    src: &InputSource,
    mt: &crate::io::ModelTensors,
    name: &str,
) -> Result<(DType, Vec<usize>)> {
    match src {
        InputSource::Tensor(n) => {
            let l = &mt.tensors[n];
            Ok((l.dtype, l.shape.clone()))
        }
        InputSource::StackExperts(parts) => {
            let first = &mt.tensors[&parts[0][0]];
            let cols = &first.shape[1..];
            let mut rows = 0usize;
            for (e, p) in parts.iter().enumerate() {
                let mut r = 0usize;
                for n in p {
                    let l = &mt.tensors[n];
                    if l.dtype != first.dtype || &l.shape[1..] != cols || l.shape.is_empty() {
                        return Err(Error::tensor(
                            name,
                            format!("expert tensor {n} does not match {}", parts[0][0]),
                        ));
                    }
                    r += l.shape[0];
                }
                if e == 0 {
                    rows = r;
                } else if r != rows {
                    return Err(Error::tensor(
                        name,
                        format!("expert {e} has {r} rows, expert 0 has {rows}"),
                    ));
                }
            }
            let mut shape = vec![parts.len(), rows];
            shape.extend_from_slice(cols);
            Ok((first.dtype, shape))
        }
    }
}

/// Synthesises transformers-v5 fused expert tensors from per-expert
/// checkpoints (Mixtral `block_sparse_moe.experts.E.w1/w2/w3`, or
/// `mlp.experts.E.{gate,up,down}_proj`), and renames Mixtral's router.
pub fn synthesize(name: &str, mt: &crate::io::ModelTensors) -> Option<InputSource> {
    let collect = |prefix: &str, parts: &[&[&str]]| -> Option<InputSource> {
        for layout in parts {
            let mut experts = Vec::new();
            for e in 0.. {
                let names: Vec<String> = layout
                    .iter()
                    .map(|p| format!("{prefix}{}", p.replace("{e}", &e.to_string())))
                    .collect();
                if names.iter().all(|n| mt.contains(n)) {
                    experts.push(names);
                } else {
                    break;
                }
            }
            if !experts.is_empty() {
                return Some(InputSource::StackExperts(experts));
            }
        }
        None
    };
    if let Some(prefix) = name.strip_suffix("mlp.experts.gate_up_proj") {
        return collect(
            prefix,
            &[
                &[
                    "block_sparse_moe.experts.{e}.w1.weight",
                    "block_sparse_moe.experts.{e}.w3.weight",
                ],
                &[
                    "mlp.experts.{e}.gate_proj.weight",
                    "mlp.experts.{e}.up_proj.weight",
                ],
            ],
        );
    }
    if let Some(prefix) = name.strip_suffix("mlp.experts.down_proj") {
        return collect(
            prefix,
            &[
                &["block_sparse_moe.experts.{e}.w2.weight"],
                &["mlp.experts.{e}.down_proj.weight"],
            ],
        );
    }
    if let Some(prefix) = name.strip_suffix("mlp.gate.weight") {
        let alt = format!("{prefix}block_sparse_moe.gate.weight");
        if mt.contains(&alt) {
            return Some(InputSource::Tensor(alt));
        }
    }
    None
}
