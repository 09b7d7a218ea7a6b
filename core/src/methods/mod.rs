//! Merge methods: one file per method, found through [`registry`].
//!
//! A method declares its parameters and how it uses the base model, decides
//! the output shape from input shapes alone (so the plan — and every
//! compatibility error — exists before any tensor is read), and merges one
//! output tensor from its input tensors.
//!
//! Numerics follow mergekit (spec §2, §4): values are held as f32 but carry
//! the working dtype's precision; each elementwise op is rounded with
//! [`DType::round`]; sums over models accumulate in f32 and round once.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub mod arcee_fusion;
pub mod generalized_task_arithmetic;
mod gta_stream;
pub mod karcher;
pub mod linear;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;
pub mod sce;
pub mod slerp;
pub mod sparsify;
pub mod stream;

/// Resolved parameter values for one tensor (and one model, for per-model ones).
pub type ParamValues = BTreeMap<String, f64>;

/// A parameter a method takes.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    /// Default when no level of the configuration sets it.
    pub default: Option<f64>,
    /// Required (for non-base models, in the per-model case).
    pub required: bool,
    /// The declared type values are checked against.
    pub kind: crate::params::ParamKind,
}

impl ParamSpec {
    pub const fn required(name: &'static str) -> ParamSpec {
        ParamSpec {
            name,
            default: None,
            required: true,
            kind: crate::params::ParamKind::Float,
        }
    }
    pub const fn default(name: &'static str, v: f64) -> ParamSpec {
        ParamSpec {
            name,
            default: Some(v),
            required: false,
            kind: crate::params::ParamKind::Float,
        }
    }
    /// A boolean parameter (true/false, 1/0) with its default.
    pub const fn flag(name: &'static str, v: bool) -> ParamSpec {
        ParamSpec {
            name,
            default: Some(v as u8 as f64),
            required: false,
            kind: crate::params::ParamKind::Bool,
        }
    }
    /// A whole-number parameter with its default.
    pub const fn int(name: &'static str, v: i64) -> ParamSpec {
        ParamSpec {
            name,
            default: Some(v as f64),
            required: false,
            kind: crate::params::ParamKind::Int,
        }
    }
    pub const fn optional(name: &'static str) -> ParamSpec {
        ParamSpec {
            name,
            default: None,
            required: false,
            kind: crate::params::ParamKind::Float,
        }
    }
}

/// How a method uses `base_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// Planning fails without a base model.
    Required,
    /// Used when given.
    Optional,
    /// Not treated specially (if listed, it is one more input).
    Unused,
}

/// Input-count limits of a method (mergekit 0.1.5's `InputContract`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputCounts {
    pub min_inputs: usize,
    pub max_inputs: Option<usize>,
    pub min_non_base: usize,
    pub max_non_base: Option<usize>,
}

impl Default for InputCounts {
    fn default() -> InputCounts {
        InputCounts {
            min_inputs: 1,
            max_inputs: None,
            min_non_base: 0,
            max_non_base: None,
        }
    }
}

impl InputCounts {
    /// Exactly `n` inputs, base included.
    pub const fn exactly(n: usize) -> InputCounts {
        InputCounts {
            min_inputs: n,
            max_inputs: Some(n),
            min_non_base: 0,
            max_non_base: None,
        }
    }

    /// Checks a slice of `inputs` inputs of which `non_base` are not the
    /// base; the message says what is wrong.
    pub fn check(&self, inputs: usize, non_base: usize) -> std::result::Result<(), String> {
        let range = |what: &str, n: usize, lo: usize, hi: Option<usize>| {
            if n < lo {
                let how = if hi == Some(lo) {
                    "exactly"
                } else {
                    "at least"
                };
                Err(format!("needs {how} {lo} {what}; got {n}"))
            } else if let Some(hi) = hi.filter(|hi| n > *hi) {
                Err(if hi == lo {
                    format!("needs exactly {lo} {what}; got {n}")
                } else {
                    format!("takes at most {hi} {what}; got {n}")
                })
            } else {
                Ok(())
            }
        };
        range("inputs", inputs, self.min_inputs, self.max_inputs)?;
        range(
            "non-base inputs",
            non_base,
            self.min_non_base,
            self.max_non_base,
        )
    }
}

/// What the planner knows about one output tensor.
#[derive(Debug)]
pub struct ShapeCtx<'a> {
    pub name: &'a str,
    pub shapes: &'a [Vec<usize>],
    pub base: Option<usize>,
    pub is_embed: bool,
    pub optional: bool,
}

/// The planner's decision for one output tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum ShapePlan {
    /// Produce a tensor of `shape` from the inputs whose `keep` flag is set.
    Output {
        shape: Vec<usize>,
        keep: Vec<bool>,
        warnings: Vec<String>,
    },
    /// Produce nothing (an optional weight the method cannot make).
    Skip(String),
}

impl ShapePlan {
    fn all(shape: Vec<usize>, n: usize) -> ShapePlan {
        ShapePlan::Output {
            shape,
            keep: vec![true; n],
            warnings: vec![],
        }
    }
}

/// One output tensor's merge: inputs in configuration order.
pub struct MergeJob<'a> {
    pub name: &'a str,
    pub tensors: Vec<Tensor>,
    pub base: Option<usize>,
    pub global: &'a ParamValues,
    pub per_model: Vec<&'a ParamValues>,
    pub is_embed: bool,
    pub seed: u64,
}

impl MergeJob<'_> {
    pub fn dtype(&self) -> DType {
        self.base
            .map(|b| self.tensors[b].dtype)
            .unwrap_or_else(|| self.tensors[0].dtype)
    }
    pub fn global(&self, k: &str) -> f64 {
        self.global.get(k).copied().unwrap_or(f64::NAN)
    }
    pub fn flag(&self, k: &str) -> bool {
        self.global.get(k).is_some_and(|v| *v != 0.0)
    }
    pub fn model_param(&self, i: usize, k: &str) -> Option<f64> {
        self.per_model[i].get(k).copied()
    }
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::tensor(self.name, msg)
    }
    /// Splits the inputs into (base, others), in order.
    pub fn split_base(&mut self) -> Option<(Tensor, Vec<Tensor>, Vec<usize>)> {
        let b = self.base?;
        let mut others = Vec::new();
        let mut idx = Vec::new();
        let mut base = None;
        for (i, t) in std::mem::take(&mut self.tensors).into_iter().enumerate() {
            if i == b {
                base = Some(t);
            } else {
                others.push(t);
                idx.push(i);
            }
        }
        Some((base?, others, idx))
    }
}

/// A merge method (spec §4).
pub trait MergeMethod: Send + Sync {
    fn name(&self) -> &'static str;
    /// Name used in the model card.
    fn pretty_name(&self) -> &'static str;
    fn reference_url(&self) -> Option<&'static str> {
        None
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![]
    }
    fn model_params(&self) -> Vec<ParamSpec> {
        vec![]
    }
    fn base_use(&self) -> BaseUse;
    /// How many inputs each slice (or the `models:` list, base included)
    /// must have — mergekit 0.1.5's `InputContract`, checked before any
    /// tensor is planned.
    fn input_counts(&self) -> InputCounts {
        InputCounts::default()
    }
    /// Output shape and used inputs, from shapes alone.
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        rectified_shape(cx)
    }
    /// Checks the resolved parameter values of one tensor before any work:
    /// `Ok(warnings)`, or an error for values that can only be mistakes or
    /// that mergekit rejects.
    fn validate(&self, cx: &ValidateCtx) -> std::result::Result<Vec<String>, String> {
        validate_common(cx)
    }
    /// Whether rows (axis 0) of the output depend only on the same rows of
    /// the inputs, so a large tensor can be merged in row blocks with
    /// identical results.
    fn row_separable(&self, _global: &ParamValues, _per_model: &[ParamValues]) -> bool {
        false
    }
    /// The dtype of the merged tensor when no `out_dtype` is configured
    /// (mergekit returns f32 from a few methods whatever the inputs).
    fn output_dtype(&self, working: DType) -> DType {
        working
    }
    fn merge(&self, job: MergeJob) -> Result<Tensor>;
    /// Whether [`MergeMethod::merge_streamed`] can merge a tensor of `shape`
    /// with these parameters: `Some(alignment)` of its blocks (elements, a
    /// multiple of [`BLOCK`]), `None` when it must be merged whole.
    fn stream_align(
        &self,
        _shape: &[usize],
        _global: &ParamValues,
        _per_model: &[ParamValues],
    ) -> Option<usize> {
        None
    }
    /// Merges one tensor reading its inputs in blocks (all inputs have the
    /// output's shape), emitting output blocks; the same values as
    /// [`MergeMethod::merge`].
    fn merge_streamed(
        &self,
        job: stream::StreamJob,
        _src: &dyn stream::BlockSource,
        _emit: stream::Emit,
    ) -> Result<()> {
        Err(job.err("internal: this method does not stream"))
    }
}

/// What [`MergeMethod::validate`] sees.
pub struct ValidateCtx<'a> {
    pub global: &'a ParamValues,
    pub per_model: &'a [ParamValues],
    /// Whether each input is the base model.
    pub is_base: &'a [bool],
    /// Each input's model, for messages.
    pub labels: &'a [String],
    pub numel: usize,
}

/// Checks shared by every method: `density` in (0, 1] for non-base models;
/// `t` outside [0, 1] is allowed with a warning.
pub fn validate_common(cx: &ValidateCtx) -> std::result::Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    for (i, pm) in cx.per_model.iter().enumerate() {
        if cx.is_base[i] {
            continue;
        }
        if let Some(d) = pm.get("density")
            && !(*d > 0.0 && *d <= 1.0)
        {
            return Err(format!(
                "density {d} for model {} is outside (0, 1]",
                cx.labels[i]
            ));
        }
    }
    if let Some(t) = cx.global.get("t")
        && !(0.0..=1.0).contains(t)
    {
        warnings.push(format!("t = {t} is outside [0, 1]: the merge extrapolates"));
    }
    Ok(warnings)
}

/// All methods, by registry name.
pub fn registry() -> Vec<Box<dyn MergeMethod>> {
    use generalized_task_arithmetic::{Consensus, GeneralizedTaskArithmetic as G, Sparsify};
    vec![
        Box::new(linear::Linear),
        Box::new(slerp::Slerp),
        Box::new(nuslerp::NuSlerp),
        Box::new(multislerp::MultiSlerp),
        Box::new(karcher::Karcher),
        Box::new(G::new(
            "task_arithmetic",
            "Task Arithmetic",
            Some("https://arxiv.org/abs/2212.04089"),
            Sparsify::None,
            Consensus::None,
            false,
            false,
        )),
        Box::new(G::new(
            "ties",
            "TIES",
            Some("https://arxiv.org/abs/2306.01708"),
            Sparsify::Magnitude,
            Consensus::Sum,
            true,
            false,
        )),
        Box::new(G::new(
            "dare_linear",
            "Linear DARE",
            Some("https://arxiv.org/abs/2311.03099"),
            Sparsify::Random,
            Consensus::None,
            false,
            true,
        )),
        Box::new(G::new(
            "dare_ties",
            "DARE TIES",
            Some("https://arxiv.org/abs/2311.03099"),
            Sparsify::Random,
            Consensus::Sum,
            false,
            true,
        )),
        Box::new(G::new(
            "breadcrumbs",
            "Model Breadcrumbs",
            Some("https://arxiv.org/abs/2312.06795"),
            Sparsify::MagnitudeOutliers,
            Consensus::None,
            false,
            false,
        )),
        Box::new(G::new(
            "breadcrumbs_ties",
            "Model Breadcrumbs with TIES",
            Some("https://arxiv.org/abs/2312.06795"),
            Sparsify::MagnitudeOutliers,
            Consensus::Sum,
            false,
            false,
        )),
        Box::new(G::new(
            "della",
            "DELLA",
            Some("https://arxiv.org/abs/2406.11617"),
            Sparsify::DellaMagprune,
            Consensus::Sum,
            true,
            true,
        )),
        Box::new(G::new(
            "della_linear",
            "Linear DELLA",
            Some("https://arxiv.org/abs/2406.11617"),
            Sparsify::DellaMagprune,
            Consensus::None,
            false,
            true,
        )),
        Box::new(sce::Sce),
        Box::new(ram::Ram { plus: false }),
        Box::new(ram::Ram { plus: true }),
        Box::new(model_stock::ModelStock),
        Box::new(nearswap::NearSwap),
        Box::new(arcee_fusion::ArceeFusion),
        Box::new(passthrough::Passthrough),
    ]
}

/// Looks a method up by its registry name.
pub fn get(name: &str) -> Option<Box<dyn MergeMethod>> {
    registry().into_iter().find(|m| m.name() == name)
}

/// Names of every registered method.
pub fn names() -> Vec<&'static str> {
    registry().iter().map(|m| m.name()).collect()
}

// ---------------------------------------------------------------------------
// Shape policies
// ---------------------------------------------------------------------------

/// mergekit's `rectify_embed_sizes` then "all shapes equal" (linear, slerp,
/// nuslerp, model_stock, arcee_fusion).
pub fn rectified_shape(cx: &ShapeCtx) -> Result<ShapePlan> {
    let n = cx.shapes.len();
    if cx.is_embed && cx.shapes.iter().all(|s| s.len() == 2) {
        let r = cx.shapes.iter().map(|s| s[0]).min().unwrap_or(0);
        let c = cx.shapes.iter().map(|s| s[1]).min().unwrap_or(0);
        let mut warnings = Vec::new();
        if cx.shapes.iter().any(|s| s[0] != r || s[1] != c) {
            warnings.push(format!(
                "{}: embedding sizes differ ({}); merging the common {r}×{c} sub-matrix, as mergekit does",
                cx.name,
                cx.shapes.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
            ));
        }
        return Ok(ShapePlan::Output {
            shape: vec![r, c],
            keep: vec![true; n],
            warnings,
        });
    }
    equal_shape(cx)
}

/// Every input must have the same shape.
pub fn equal_shape(cx: &ShapeCtx) -> Result<ShapePlan> {
    let first = &cx.shapes[0];
    if let Some(other) = cx.shapes.iter().find(|s| *s != first) {
        return Err(Error::tensor(
            cx.name,
            format!("shape mismatch between inputs: {first:?} vs {other:?}"),
        ));
    }
    Ok(ShapePlan::all(first.clone(), cx.shapes.len()))
}

/// Truncates 2-D embedding inputs to the common top-left sub-matrix.
pub fn rectify(tensors: &mut [Tensor], shape: &[usize]) {
    if shape.len() != 2 {
        return;
    }
    for t in tensors.iter_mut() {
        if t.shape != shape && t.shape.len() == 2 {
            *t = t.top_left(shape[0], shape[1]);
        }
    }
}

// ---------------------------------------------------------------------------
// Kernel helpers
// ---------------------------------------------------------------------------

/// Elements per parallel block. Reductions combine per-block partial sums in
/// block order, so results do not depend on the thread count.
pub const BLOCK: usize = 1 << 15;

/// Deterministic parallel sum of `f(i)` over `0..n`, in f64.
pub fn sum_by(n: usize, f: impl Fn(usize) -> f64 + Sync) -> f64 {
    let nb = n.div_ceil(BLOCK);
    let parts: Vec<f64> = (0..nb)
        .into_par_iter()
        .map(|b| {
            let lo = b * BLOCK;
            let hi = (lo + BLOCK).min(n);
            let mut s = 0.0f64;
            for i in lo..hi {
                s += f(i);
            }
            s
        })
        .collect();
    parts.into_iter().sum()
}

/// Deterministic parallel Σ|x| in f64: per-[`BLOCK`] partial sums
/// ([`crate::simd::abs_sum`], 32 lanes) combined in block order.
pub fn sum_abs(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(BLOCK).map(crate::simd::abs_sum).collect();
    parts.into_iter().sum()
}

/// Fills `out[i] = f(i)` in parallel.
pub fn fill(out: &mut [f32], f: impl Fn(usize) -> f32 + Sync) {
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            let base = b * BLOCK;
            for (j, o) in chunk.iter_mut().enumerate() {
                *o = f(base + j);
            }
        });
}

/// A new vector of `f(i)` for `0..n` (written in place, no zeroing pass).
pub fn map_n(n: usize, f: impl Fn(usize) -> f32 + Sync + Send) -> Vec<f32> {
    (0..n).into_par_iter().with_min_len(4096).map(f).collect()
}

/// L2 norm of a slice, as f32 (accumulated in f64).
pub fn norm(x: &[f32]) -> f32 {
    sum_by(x.len(), |i| (x[i] as f64) * (x[i] as f64)).sqrt() as f32
}

/// torch's `sign`: -1, 0 or 1 (zero of either sign is 0).
#[inline(always)]
pub fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}
