//! The task-arithmetic family (spec §4.6): task_arithmetic, ties,
//! dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
//! della_linear — one kernel configured by a sparsification, a consensus and
//! default `normalize` / `rescale` values.

use super::sparsify;
use super::*;
use crate::rng::Stream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    Magnitude,
    Random,
    MagnitudeOutliers,
    DellaMagprune,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    None,
    /// TIES sign election over the summed weighted deltas.
    Sum,
}

pub struct GeneralizedTaskArithmetic {
    pub(super) name: &'static str,
    pretty: &'static str,
    url: Option<&'static str>,
    pub(super) sparsify: Sparsify,
    pub(super) consensus: Consensus,
    normalize: bool,
    rescale: bool,
}

impl GeneralizedTaskArithmetic {
    pub fn new(
        name: &'static str,
        pretty: &'static str,
        url: Option<&'static str>,
        sparsify: Sparsify,
        consensus: Consensus,
        normalize: bool,
        rescale: bool,
    ) -> Self {
        GeneralizedTaskArithmetic {
            name,
            pretty,
            url,
            sparsify,
            consensus,
            normalize,
            rescale,
        }
    }
}

/// Shape rule of the family: output has the base's shape; larger embeddings
/// are truncated to it; other mismatched models are skipped with a warning.
pub fn task_vector_shapes(cx: &ShapeCtx) -> Result<ShapePlan> {
    let b = cx
        .base
        .ok_or_else(|| Error::tensor(cx.name, "the base model is not among this tensor's inputs (with `slices:`, list the base model as a source of every slice)"))?;
    let bs = &cx.shapes[b];
    let mut keep = vec![true; cx.shapes.len()];
    let mut warnings = Vec::new();
    for (i, s) in cx.shapes.iter().enumerate() {
        if i == b || s == bs {
            continue;
        }
        if cx.is_embed && s.len() == 2 && bs.len() == 2 {
            if s[0] >= bs[0] && s[1] >= bs[1] {
                continue;
            }
            return Err(Error::tensor(
                cx.name,
                format!("embedding {s:?} is smaller than the base model's {bs:?}"),
            ));
        }
        keep[i] = false;
        warnings.push(format!(
            "{}: skipping an input of shape {s:?}: does not match the base model's {bs:?}",
            cx.name
        ));
    }
    Ok(ShapePlan::Output {
        shape: bs.clone(),
        keep,
        warnings,
    })
}

impl MergeMethod for GeneralizedTaskArithmetic {
    fn name(&self) -> &'static str {
        self.name
    }
    fn pretty_name(&self) -> &'static str {
        self.pretty
    }
    fn reference_url(&self) -> Option<&'static str> {
        self.url
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::flag("int8_mask", false),
            ParamSpec::flag("normalize", self.normalize),
            ParamSpec::flag("rescale", self.rescale),
            ParamSpec::default("lambda", 1.0),
        ]
    }
    fn model_params(&self) -> Vec<ParamSpec> {
        let mut v = vec![
            ParamSpec::required("weight"),
            ParamSpec::default("density", 1.0),
        ];
        match self.sparsify {
            Sparsify::MagnitudeOutliers => v.push(ParamSpec::default("gamma", 0.01)),
            Sparsify::DellaMagprune => v.push(ParamSpec::default("epsilon", 0.15)),
            _ => {}
        }
        v
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }
    fn row_separable(&self, _global: &ParamValues, per_model: &[ParamValues]) -> bool {
        // sparsification looks at the whole tensor, unless it is a no-op
        self.sparsify == Sparsify::None
            || per_model
                .iter()
                .all(|p| p.get("density").is_none_or(|d| *d >= 1.0))
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        task_vector_shapes(cx)
    }
    fn stream_align(
        &self,
        shape: &[usize],
        _global: &ParamValues,
        _per_model: &[ParamValues],
    ) -> Option<usize> {
        GeneralizedTaskArithmetic::stream_align(self, shape)
    }
    fn merge_streamed(
        &self,
        job: super::stream::StreamJob,
        src: &dyn super::stream::BlockSource,
        emit: super::stream::Emit,
    ) -> Result<()> {
        self.merge_streamed_impl(job, src, emit)
    }
    fn validate(&self, cx: &ValidateCtx) -> std::result::Result<Vec<String>, String> {
        let warnings = validate_common(cx)?;
        for (i, pm) in cx.per_model.iter().enumerate() {
            let density = pm.get("density").copied().unwrap_or(1.0);
            if cx.is_base[i] || density >= 1.0 {
                continue;
            }
            match self.sparsify {
                // density ≤ 0 zeroes the task vector before epsilon is checked
                Sparsify::DellaMagprune if density > 0.0 => {
                    let eps = pm.get("epsilon").copied().unwrap_or(0.15);
                    if !(density - eps > 0.0 && density + eps < 1.0) {
                        return Err(format!(
                            "della: density {density} ± epsilon {eps} for model {} must stay inside (0, 1)",
                            cx.labels[i]
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok(warnings)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        let name = job.name;
        let seed = job.seed;
        let normalize = job.flag("normalize");
        let rescale = job.flag("rescale");
        let lambda = job.global("lambda");
        let params: Vec<(f64, f64, f64, f64)> = (0..job.tensors.len())
            .map(|i| {
                (
                    job.model_param(i, "weight").unwrap_or(f64::NAN),
                    job.model_param(i, "density").unwrap_or(1.0),
                    job.model_param(i, "gamma").unwrap_or(0.01),
                    job.model_param(i, "epsilon").unwrap_or(0.15),
                )
            })
            .collect();
        let (base, others, idx) = job.split_base().ok_or_else(|| {
            Error::tensor(name, "the base model is not among this tensor's inputs")
        })?;
        let dt = base.dtype;
        let r = |x: f32| dt.round(x);

        if others.is_empty() {
            return Ok(base);
        }
        let mut deltas: Vec<Vec<f32>> = Vec::new();
        let mut weights: Vec<f32> = Vec::new();
        for (k, (x, i)) in others.iter().zip(&idx).enumerate() {
            let (w, density, gamma, epsilon) = params[*i];
            if w.is_nan() {
                return Err(Error::tensor(
                    name,
                    format!("{}: a model has no `weight`", self.name),
                ));
            }
            let x = if x.shape != base.shape && x.shape.len() == 2 {
                x.top_left(base.shape[0], base.shape[1])
            } else {
                x.clone()
            };
            let d = sub_rounded(dt, &x.data, &base.data);
            let stream = Stream::new(seed, name, &format!("{}:{k}", self.name));
            let d = match self.sparsify {
                Sparsify::None => d,
                Sparsify::Magnitude => sparsify::magnitude(&d, density, rescale, dt),
                Sparsify::Random => sparsify::bernoulli(&d, density, rescale, dt, stream),
                Sparsify::MagnitudeOutliers => {
                    sparsify::magnitude_outliers(&d, density, gamma, rescale, dt)
                }
                Sparsify::DellaMagprune => sparsify::della_magprune(
                    &d,
                    &base.shape,
                    density,
                    epsilon,
                    rescale,
                    dt,
                    stream,
                    name,
                )?,
            };
            deltas.push(d);
            weights.push(r(w as f32));
        }
        let consensus = self.consensus;
        let out = crate::with_rounding!(dt, |rr| combine(
            rr, &base.data, &deltas, &weights, consensus, normalize, lambda
        ));
        Ok(Tensor::new(base.shape.clone(), out, dt))
    }
}

/// `r(a − b)` elementwise.
pub fn sub_rounded(dt: DType, a: &[f32], b: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    crate::with_rounding!(dt, |rr| a
        .par_iter()
        .zip(b.par_iter())
        .with_min_len(4096)
        .map(|(x, y)| rr.r(x - y))
        .collect())
}

/// Weighted deltas, sign consensus, normalisation, lambda, base add — per
/// block, each op rounded to the working dtype.
fn combine<R: crate::dtype::Rounding>(
    r: R,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    consensus: Consensus,
    normalize: bool,
    lambda: f64,
) -> Vec<f32> {
    use rayon::prelude::*;
    let n = base.len();
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each_init(CombineScratch::default, |s, (b, o)| {
            let lo = b * BLOCK;
            let len = o.len();
            let ms: Vec<&[f32]> = deltas.iter().map(|d| &d[lo..lo + len]).collect();
            combine_chunk(
                r,
                &base[lo..lo + len],
                &ms,
                weights,
                consensus,
                normalize,
                lambda,
                o,
                s,
            );
        });
    out
}

/// Buffers of [`combine_chunk`].
#[derive(Default)]
pub struct CombineScratch {
    wd: Vec<Vec<f32>>,
    sum: Vec<f32>,
    maj: Vec<f32>,
    div: Vec<f32>,
}

crate::simd::multiversion! {
    /// The elementwise combination of sparsified deltas `ms` (one slice per
    /// model) with the base: weights, consensus, normalisation, lambda, base add,
    /// each op rounded. Elementwise, so any chunking gives the same bytes.
    /// Runs with the widest vector unit this CPU has ([`crate::simd`]); the same
    /// bits whichever variant runs.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_chunk<R: crate::dtype::Rounding>(
        r: R,
        base: &[f32],
        ms: &[&[f32]],
        weights: &[f32],
        consensus: Consensus,
        normalize: bool,
        lambda: f64,
        o: &mut [f32],
        s: &mut CombineScratch,
    ) {
        let wsum = r.r(weights.iter().sum::<f32>());
        let plain_div = if wsum.abs() < 1e-8 { 1.0 } else { wsum };
        let lam = lambda as f32;
        let k = Knobs {
            sum: consensus == Consensus::Sum,
            normalize,
            plain_div,
            lam: (lambda != 1.0).then_some(lam),
        };
        // one pass per element, everything in registers, for the usual
        // model counts
        if !fused_any(r, base, ms, weights, k, o) {
            staged(r, base, ms, weights, k, o, s);
        }
    }
}

/// [`combine_chunk`] in stages over the chunk (any model count).
#[inline(always)]
fn staged<R: crate::dtype::Rounding>(
    r: R,
    base: &[f32],
    ms: &[&[f32]],
    weights: &[f32],
    k: Knobs,
    o: &mut [f32],
    s: &mut CombineScratch,
) {
    let len = o.len();
    let (plain_div, normalize) = (k.plain_div, k.normalize);
    let consensus = if k.sum {
        Consensus::Sum
    } else {
        Consensus::None
    };
    while s.wd.len() < ms.len() {
        s.wd.push(Vec::new());
    }
    for ((wd, d), w) in s.wd.iter_mut().zip(ms).zip(weights) {
        wd.clear();
        wd.extend(d[..len].iter().map(|x| r.r(x * w)));
    }
    let wd = &s.wd[..ms.len()];
    match consensus {
        Consensus::Sum => {
            let sum = &mut s.sum;
            sum.clear();
            sum.resize(len, 0.0);
            for w in wd {
                for (s, x) in sum.iter_mut().zip(w) {
                    *s += x;
                }
            }
            // majority sign (zero counts as positive); branch-free so
            // the loops vectorise: x·maj > 0 ⇔ sign(x) == maj and x ≠ 0
            let maj = &mut s.maj;
            maj.clear();
            maj.extend(
                sum.iter()
                    .map(|s| if r.r(*s) >= 0.0 { 1.0f32 } else { -1.0 }),
            );
            let div = &mut s.div;
            div.clear();
            div.resize(len, 0.0);
            o.fill(0.0);
            for (w, wk) in wd.iter().zip(weights) {
                let wk = *wk;
                for (((oi, di), m), x) in o
                    .iter_mut()
                    .zip(div.iter_mut())
                    .zip(maj.iter())
                    .zip(&w[..len])
                {
                    let agree = x * m > 0.0;
                    *oi += if agree { *x } else { 0.0 };
                    *di += if agree { wk } else { 0.0 };
                }
            }
            for (oi, dv) in o.iter_mut().zip(div.iter_mut()) {
                *oi = r.r(*oi);
                let d = r.r(*dv);
                *dv = if d == 0.0 { 1.0 } else { d };
            }
            if normalize {
                for (oi, dv) in o.iter_mut().zip(div.iter()) {
                    *oi = r.r(*oi / dv);
                }
            }
        }
        Consensus::None => {
            o.fill(0.0);
            for w in wd {
                for (oi, x) in o.iter_mut().zip(w) {
                    *oi += x;
                }
            }
            for oi in o.iter_mut() {
                *oi = r.r(*oi);
                if normalize {
                    *oi = r.r(*oi / plain_div);
                }
            }
        }
    }
    if let Some(lam) = k.lam {
        for oi in o.iter_mut() {
            *oi = r.r(*oi * lam);
        }
    }
    for (oi, bi) in o.iter_mut().zip(base) {
        *oi = r.r(bi + *oi);
    }
}

/// [`combine_chunk`]'s loop-invariant choices.
#[derive(Clone, Copy)]
struct Knobs {
    sum: bool,
    normalize: bool,
    plain_div: f32,
    lam: Option<f32>,
}

/// [`fused`] for the model counts it is compiled for (1–4); false, doing
/// nothing, for others.
#[inline(always)]
fn fused_any<R: crate::dtype::Rounding>(
    r: R,
    base: &[f32],
    ms: &[&[f32]],
    weights: &[f32],
    k: Knobs,
    o: &mut [f32],
) -> bool {
    match ms.len() {
        1 => fused::<1, R>(r, base, ms, weights, k, o),
        2 => {
            // AVX-512 BF16 for whole vectors where it can, this loop for the rest
            let done = if R::IS_BF16 {
                let w = [weights[0], weights[1]];
                let (sum, nz) = (k.sum, k.normalize);
                crate::simd::combine2_bf16(base, ms[0], ms[1], w, sum, nz, k.plain_div, k.lam, o)
            } else {
                0
            };
            let rest = [&ms[0][done..], &ms[1][done..]];
            fused::<2, R>(r, &base[done..], &rest, weights, k, &mut o[done..])
        }
        3 => fused::<3, R>(r, base, ms, weights, k, o),
        4 => fused::<4, R>(r, base, ms, weights, k, o),
        _ => return false,
    }
    true
}

/// [`combine_chunk`] for `N` models in one pass per element: the same
/// operations in the same order as its staged loops (the same bits), with
/// every intermediate in registers.
#[inline(always)]
fn fused<const N: usize, R: crate::dtype::Rounding>(
    r: R,
    base: &[f32],
    ms: &[&[f32]],
    weights: &[f32],
    k: Knobs,
    o: &mut [f32],
) {
    // every choice its own loop (constants, not a select per element: LLVM
    // would compute both sides, a division included)
    match (k.sum, k.normalize, k.lam.is_some()) {
        (false, false, false) => {
            fused_loop::<N, false, false, false, R>(r, base, ms, weights, k, o)
        }
        (false, false, true) => fused_loop::<N, false, false, true, R>(r, base, ms, weights, k, o),
        (false, true, false) => fused_loop::<N, false, true, false, R>(r, base, ms, weights, k, o),
        (false, true, true) => fused_loop::<N, false, true, true, R>(r, base, ms, weights, k, o),
        (true, false, false) => fused_loop::<N, true, false, false, R>(r, base, ms, weights, k, o),
        (true, false, true) => fused_loop::<N, true, false, true, R>(r, base, ms, weights, k, o),
        (true, true, false) => fused_loop::<N, true, true, false, R>(r, base, ms, weights, k, o),
        (true, true, true) => fused_loop::<N, true, true, true, R>(r, base, ms, weights, k, o),
    }
}

/// [`fused`]'s loop for one combination of consensus (`SUM`),
/// normalisation (`NZ`) and lambda (`LAM`).
#[inline(always)]
fn fused_loop<
    const N: usize,
    const SUM: bool,
    const NZ: bool,
    const LAM: bool,
    R: crate::dtype::Rounding,
>(
    r: R,
    base: &[f32],
    ms: &[&[f32]],
    weights: &[f32],
    k: Knobs,
    o: &mut [f32],
) {
    let len = o.len();
    let base = &base[..len];
    let ms: [&[f32]; N] = std::array::from_fn(|m| &ms[m][..len]);
    let w: [f32; N] = std::array::from_fn(|m| weights[m]);
    let lam = k.lam.unwrap_or(1.0);
    let plain_div = k.plain_div;
    for (i, oi) in o.iter_mut().enumerate() {
        let wd: [f32; N] = std::array::from_fn(|m| r.r(ms[m][i] * w[m]));
        let mut v = if SUM {
            let mut sum = 0.0f32;
            for x in wd {
                sum += x;
            }
            // majority sign (zero counts as positive)
            let maj = if r.r(sum) >= 0.0 { 1.0f32 } else { -1.0 };
            let (mut acc, mut div) = (0.0f32, 0.0f32);
            for m in 0..N {
                let agree = wd[m] * maj > 0.0;
                acc += if agree { wd[m] } else { 0.0 };
                div += if agree { w[m] } else { 0.0 };
            }
            let v = r.r(acc);
            let d = r.r(div);
            let d = if d == 0.0 { 1.0 } else { d };
            if NZ { r.r(v / d) } else { v }
        } else {
            let mut acc = 0.0f32;
            for x in wd {
                acc += x;
            }
            let v = r.r(acc);
            if NZ { r.r(v / plain_div) } else { v }
        };
        if LAM {
            v = r.r(v * lam);
        }
        *oi = r.r(base[i] + v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass combination gives the staged loops' bits, for every
    /// model count it covers (and declines five models), both consensus rules, with and without
    /// normalisation and lambda, in bfloat16 and float32, on deltas with
    /// zeros of both signs, NaN and infinities.
    #[test]
    fn fused_combination_equals_the_staged_one() {
        fn go<R: crate::dtype::Rounding>(r: R) {
            let s = crate::rng::Stream::new(9, "combine", "x");
            let len = 777;
            let val = |i: u64| match i % 101 {
                0 => 0.0,
                1 => -0.0,
                2 => f32::NAN,
                3 => f32::INFINITY,
                4 => -1e-40,
                _ => r.r((s.uniform(i) - 0.5) * 2.0),
            };
            let base: Vec<f32> = (0..len as u64).map(|i| val(i + 50_000)).collect();
            let five: Vec<&[f32]> = vec![&base; 5];
            let knobs = Knobs {
                sum: true,
                normalize: true,
                plain_div: 1.0,
                lam: None,
            };
            let mut untouched = vec![7f32; len];
            assert!(!fused_any(
                r,
                &base,
                &five,
                &[0.2; 5],
                knobs,
                &mut untouched
            ));
            assert!(untouched.iter().all(|x| *x == 7.0));
            for n in 1..=4usize {
                let ms: Vec<Vec<f32>> = (0..n)
                    .map(|m| (0..len as u64).map(|i| val(i + 1000 * m as u64)).collect())
                    .collect();
                let msr: Vec<&[f32]> = ms.iter().map(|v| v.as_slice()).collect();
                for weights in [
                    vec![0.5f32, 0.3, 0.2, 0.1],
                    vec![1.0, -0.7, 0.0, 2.5],
                    vec![0.0; 4],
                    // a signed zero; agreeing weights that sum to zero
                    vec![-0.0, 0.5, 0.5, 0.5],
                    vec![0.75, -0.75, 1.0, 1.0],
                ] {
                    let w = &weights[..n];
                    for sum in [true, false] {
                        for normalize in [true, false] {
                            for lam in [None, Some(0.7f32)] {
                                let wsum = r.r(w.iter().sum::<f32>());
                                let k = Knobs {
                                    sum,
                                    normalize,
                                    plain_div: if wsum.abs() < 1e-8 { 1.0 } else { wsum },
                                    lam,
                                };
                                let mut a = vec![0f32; len];
                                let mut b = vec![1f32; len];
                                assert!(fused_any(r, &base, &msr, w, k, &mut a));
                                staged(
                                    r,
                                    &base,
                                    &msr,
                                    w,
                                    k,
                                    &mut b,
                                    &mut CombineScratch::default(),
                                );
                                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                                    assert!(
                                        x.to_bits() == y.to_bits(),
                                        "n {n} sum {sum} norm {normalize} lam {lam:?} w {w:?} [{i}]: {x} vs {y}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        go(crate::dtype::Bf16Rounding);
        go(crate::dtype::ExactRounding);
    }

    fn run(
        method: &str,
        base: Vec<f32>,
        xs: Vec<Vec<f32>>,
        w: Vec<f64>,
        g: &[(&str, f64)],
    ) -> Vec<f32> {
        let m = get(method).unwrap();
        let mut global: ParamValues = m
            .global_params()
            .iter()
            .filter_map(|p| p.default.map(|d| (p.name.to_string(), d)))
            .collect();
        for (k, v) in g {
            global.insert(k.to_string(), *v);
        }
        let mut pm: Vec<ParamValues> = w
            .iter()
            .map(|w| [("weight".to_string(), *w)].into())
            .collect();
        pm.push(ParamValues::new());
        let n = base.len();
        let mut tensors: Vec<Tensor> = xs
            .into_iter()
            .map(|x| Tensor::new(vec![n], x, DType::F32))
            .collect();
        tensors.push(Tensor::new(vec![n], base, DType::F32));
        let b = tensors.len() - 1;
        m.merge(MergeJob {
            name: "t",
            tensors,
            base: Some(b),
            global: &global,
            per_model: pm.iter().collect(),
            is_embed: false,
            seed: 0,
        })
        .unwrap()
        .data
    }

    #[test]
    fn task_arithmetic_by_hand() {
        let out = run(
            "task_arithmetic",
            vec![1.0, 1.0],
            vec![vec![2.0, 0.0], vec![1.0, 3.0]],
            vec![1.0, 0.5],
            &[],
        );
        // base + 1.0*(1,-1) + 0.5*(0,2) = (2, 1)
        assert_eq!(out, vec![2.0, 1.0]);
        let out = run(
            "task_arithmetic",
            vec![1.0, 1.0],
            vec![vec![2.0, 0.0]],
            vec![1.0],
            &[("lambda", 2.0)],
        );
        assert_eq!(out, vec![3.0, -1.0]);
    }

    #[test]
    fn ties_sign_election_by_hand() {
        // deltas: m1 = (+2, -1, 0), m2 = (-1, -1, +3), m3 = (+1, +4, 0); weights 1
        // sums: (+2, +2, +3) → majority +; position 0 keeps m1, m3 → (2+1)/2 = 1.5
        // position 1 keeps only m3 → 4/1; position 2 keeps m2 → 3
        let out = run(
            "ties",
            vec![0.0, 0.0, 0.0],
            vec![
                vec![2.0, -1.0, 0.0],
                vec![-1.0, -1.0, 3.0],
                vec![1.0, 4.0, 0.0],
            ],
            vec![1.0, 1.0, 1.0],
            &[],
        );
        assert_eq!(out, vec![1.5, 4.0, 3.0]);
        // a negative weight flips its vote
        let out = run(
            "ties",
            vec![0.0],
            vec![vec![1.0], vec![1.0]],
            vec![1.0, -3.0],
            &[],
        );
        // weighted: (+1, -3) → sum -2 → majority -; keeps model 2: -3 / -3 = 1
        assert_eq!(out, vec![1.0]);
    }
}
