//! `arcee_fusion`: keep the other model's changes only where their
//! importance (|Δ| × per-row KL divergence of softmaxes) exceeds
//! median + 1.5·IQR (spec §4.12).

use super::*;
use crate::rng::Stream;

pub struct ArceeFusion;

impl MergeMethod for ArceeFusion {
    fn name(&self) -> &'static str {
        "arcee_fusion"
    }
    fn pretty_name(&self) -> &'static str {
        "Arcee Fusion"
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://arcee.ai")
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }
    fn input_counts(&self) -> InputCounts {
        InputCounts::exactly(2)
    }
    fn output_dtype(&self, _working: DType) -> DType {
        DType::F32
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        let n = cx.shapes.len();
        if n == 1 {
            return Ok(ShapePlan::all(cx.shapes[0].clone(), 1));
        }
        if n != 2 {
            return Err(Error::tensor(
                cx.name,
                format!("arcee_fusion expects exactly two models, got {n}"),
            ));
        }
        if cx.base.is_none() {
            return Err(Error::tensor(
                cx.name,
                "arcee_fusion: base model not in input tensors",
            ));
        }
        rectified_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        let name = job.name;
        if job.tensors.len() == 1 {
            return Ok(job.tensors.pop().expect("one"));
        }
        let ShapePlan::Output { shape, .. } = self.plan_shapes(&ShapeCtx {
            name,
            shapes: &job
                .tensors
                .iter()
                .map(|t| t.shape.clone())
                .collect::<Vec<_>>(),
            base: job.base,
            is_embed: job.is_embed,
            optional: false,
        })?
        else {
            unreachable!()
        };
        rectify(&mut job.tensors, &shape);
        let seed = job.seed;
        let (a, xs, _) = job
            .split_base()
            .ok_or_else(|| Error::tensor(name, "arcee_fusion: base model not in input tensors"))?;
        let b = &xs[0];
        let dt = a.dtype;
        let r = |x: f32| dt.round(x);
        let n = a.numel();
        let len = a.last_dim().max(1);
        let rows = n / len;
        // per-row KL(softmax(b) || softmax(a))
        let softmax = |v: &[f32]| -> Vec<f32> {
            let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = v.iter().map(|x| ((x - m) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| r(r((x / s) as f32) + 1e-8)).collect()
        };
        let kl: Vec<f32> = if dt == DType::F32 {
            // the KL's terms cancel: round every step as torch does
            crate::torch_kl::kl_rows_torch(&b.data, &a.data, len)
        } else {
            use rayon::prelude::*;
            (0..rows)
                .into_par_iter()
                .map(|row| {
                    let lo = row * len;
                    let p = softmax(&b.data[lo..lo + len]);
                    let q = softmax(&a.data[lo..lo + len]);
                    let mut s = 0.0f64;
                    for (pi, qi) in p.iter().zip(&q) {
                        s += r(pi * r(r(pi / qi).ln())) as f64;
                    }
                    r(s as f32)
                })
                .collect()
        };
        let imp = map_n(n, |i| r(r((b.data[i] - a.data[i]).abs()) * kl[i / len]));
        // quantiles, on a deterministic subsample of 1e6 elements for large tensors
        let mut sample: Vec<f32> = if n > 1_000_000 {
            let s = Stream::new(seed, name, "arcee_fusion:sample");
            let mut idx: Vec<(u64, u32)> = (0..n as u32).map(|i| (s.bits(i as u64), i)).collect();
            idx.select_nth_unstable(1_000_000 - 1);
            idx[..1_000_000]
                .iter()
                .map(|(_, i)| imp[*i as usize])
                .collect()
        } else {
            imp.clone()
        };
        sample.sort_by(|x, y| x.total_cmp(y));
        let m = sample.len();
        let q = |f: f32| sample[((f * (m as f32 - 1.0)) as usize).min(m - 1)];
        let (q1, med, q3) = (q(0.25), q(0.5), q(0.75));
        let thr = r(med + r(1.5 * r(q3 - q1)));
        let out = map_n(n, |i| {
            // mergekit's mask is float32, so `a + delta·mask` is computed (and
            // returned) in f32
            if imp[i] >= thr {
                a.data[i] + r(b.data[i] - a.data[i])
            } else {
                a.data[i]
            }
        });
        Ok(Tensor::new(shape, out, DType::F32))
    }
}
