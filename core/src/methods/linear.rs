//! `linear`: weighted average (spec §4.1).

use super::*;

pub struct Linear;

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn pretty_name(&self) -> &'static str {
        "Linear"
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://arxiv.org/abs/2203.05482")
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::flag("normalize", true)]
    }
    fn model_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::required("weight")]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Unused
    }
    fn row_separable(&self, _global: &ParamValues, _per_model: &[ParamValues]) -> bool {
        true
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        let dt = job.dtype();
        let shape = rectified_shape(&ShapeCtx {
            name: job.name,
            shapes: &job
                .tensors
                .iter()
                .map(|t| t.shape.clone())
                .collect::<Vec<_>>(),
            base: job.base,
            is_embed: job.is_embed,
            optional: false,
        })?;
        let ShapePlan::Output { shape, .. } = shape else {
            unreachable!()
        };
        rectify(&mut job.tensors, &shape);
        let mut w = Vec::new();
        for i in 0..job.tensors.len() {
            let v = job
                .model_param(i, "weight")
                .ok_or_else(|| job.err("linear: a model has no `weight` (is base_model listed under models without a weight?)"))?;
            // mergekit 0.1.5 keeps the coefficients in f32 (f64 only for
            // float64 tensors), whatever the working dtype
            w.push(v as f32);
        }
        Ok(weighted_sum(
            &job.tensors,
            &w,
            job.flag("normalize"),
            dt,
            shape,
        ))
    }
}

/// `Σ w_i·x_i` in f32, optionally divided by the f32 weight sum, rounded
/// once to the working dtype: mergekit 0.1.5's `linear` (f32 coefficients,
/// `addcmul_` into an f32 accumulator, `div_`, then `.to(dtype)`).
pub fn weighted_sum(
    xs: &[Tensor],
    w: &[f32],
    normalize: bool,
    dt: DType,
    shape: Vec<usize>,
) -> Tensor {
    let data = crate::with_rounding!(dt, |r| weighted_sum_r(r, xs, w, normalize));
    Tensor::new(shape, data, dt)
}

fn weighted_sum_r<R: crate::dtype::Rounding>(
    r: R,
    xs: &[Tensor],
    w: &[f32],
    normalize: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    let n = xs[0].numel();
    let wsum = w.iter().fold(0.0f32, |a, b| a + b);
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, o)| {
        let lo = b * BLOCK;
        block_sum(r, o, xs, lo, w, normalize.then_some(wsum));
    });
    out
}

crate::simd::multiversion! {
    /// One block of [`weighted_sum`], compiled for baseline x86-64, AVX2 and
    /// AVX-512 and picked at run time as `crate::simd`'s kernels (plain IEEE
    /// operations only, so every variant gives the same bits).
    fn block_sum<R: crate::dtype::Rounding>(
        r: R,
        o: &mut [f32],
        xs: &[Tensor],
        lo: usize,
        w: &[f32],
        wsum: Option<f32>,
    ) {
        for (k, (x, wk)) in xs.iter().zip(w).enumerate() {
            let src = &x.data[lo..lo + o.len()];
            if k == 0 {
                // torch: 0 + w·x (turns a -0 product into +0)
                for (oi, xi) in o.iter_mut().zip(src) {
                    *oi = 0.0 + wk * xi;
                }
            } else {
                for (oi, xi) in o.iter_mut().zip(src) {
                    *oi += wk * xi;
                }
            }
        }
        match wsum {
            Some(wsum) => {
                for oi in o.iter_mut() {
                    *oi = r.r(*oi / wsum);
                }
            }
            None => {
                for oi in o.iter_mut() {
                    *oi = r.r(*oi);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job<'a>(ts: Vec<Tensor>, g: &'a ParamValues, pm: Vec<&'a ParamValues>) -> MergeJob<'a> {
        MergeJob {
            name: "t",
            tensors: ts,
            base: None,
            global: g,
            per_model: pm,
            is_embed: false,
            seed: 0,
        }
    }

    #[test]
    fn hand_computed() {
        let a = Tensor::new(vec![2], vec![1.0, 2.0], DType::F32);
        let b = Tensor::new(vec![2], vec![3.0, 6.0], DType::F32);
        let g: ParamValues = [("normalize".to_string(), 1.0)].into();
        let w1: ParamValues = [("weight".to_string(), 1.0)].into();
        let w3: ParamValues = [("weight".to_string(), 3.0)].into();
        let out = Linear.merge(job(vec![a, b], &g, vec![&w1, &w3])).unwrap();
        assert_eq!(out.data, vec![2.5, 5.0]);
    }

    #[test]
    fn bf16_accumulates_in_f32_and_rounds_once() {
        // mergekit 0.1.5: f32 coefficients and accumulator, one rounding at
        // the end. 0.1.4 rounded the weights to bf16 (0.69921875,
        // -0.69140625) and every product: 0.0078125 here.
        let a = Tensor::new(vec![1], vec![1.0], DType::BF16);
        let b = Tensor::new(vec![1], vec![1.0], DType::BF16);
        let g: ParamValues = [("normalize".to_string(), 0.0)].into();
        let w7: ParamValues = [("weight".to_string(), 0.7)].into();
        let w69: ParamValues = [("weight".to_string(), -0.69)].into();
        let out = Linear.merge(job(vec![a, b], &g, vec![&w7, &w69])).unwrap();
        assert_eq!(out.data, vec![DType::BF16.round(0.7f32 - 0.69f32)]);
        assert_eq!(out.data, vec![164.0 / 16384.0]); // 0.010009765625
    }

    proptest! {
        #[test]
        fn one_model_is_identity(v in proptest::collection::vec(-1e3f32..1e3, 1..64), w in 0.1f64..10.0) {
            let t = Tensor::new(vec![v.len()], v.clone(), DType::F32);
            let g: ParamValues = [("normalize".to_string(), 1.0)].into();
            let pw: ParamValues = [("weight".to_string(), w)].into();
            let out = Linear.merge(job(vec![t], &g, vec![&pw])).unwrap();
            for (o, x) in out.data.iter().zip(&v) {
                prop_assert!((o - x).abs() <= 1e-5 * x.abs().max(1.0));
            }
        }
    }
}
