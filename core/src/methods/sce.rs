//! `sce`: select (top variance positions), calculate (weights from mean
//! squares), erase (TIES sign consensus) — spec §4.8. Model weights are ignored.

use super::*;

pub struct Sce;

impl MergeMethod for Sce {
    fn name(&self) -> &'static str {
        "sce"
    }
    fn pretty_name(&self) -> &'static str {
        "SCE"
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://arxiv.org/abs/2408.07990")
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::flag("int8_mask", false),
            ParamSpec::default("select_topk", 1.0),
        ]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        base_present(cx)?;
        equal_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        let name = job.name;
        let topk = job.global("select_topk");
        let (base, xs, _) = job.split_base().ok_or_else(|| {
            Error::tensor(name, "sce: base model tensor required but not present")
        })?;
        if xs.is_empty() {
            return Ok(base);
        }
        let dt = base.dtype;
        let r = |x: f32| dt.round(x);
        let n = base.numel();
        let k = xs.len();
        let mut tv: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| map_n(n, |i| r(x.data[i] - base.data[i])))
            .collect();
        if topk < 1.0 {
            let mask: Vec<bool> = if topk <= 0.0 {
                vec![false; n]
            } else {
                let var: Vec<f32> = map_n(n, |i| {
                    let mean = tv.iter().map(|t| t[i] as f64).sum::<f64>() / k as f64;
                    let v = tv.iter().map(|t| (t[i] as f64 - mean).powi(2)).sum::<f64>() / k as f64;
                    r(v as f32)
                });
                let nz = var.iter().filter(|v| **v != 0.0).count();
                // torch: int64 count × python float → float32, then int()
                let kk = (nz as f32 * topk as f32) as usize;
                // torch.topk(var.abs(), k): its ties in torch's order
                // (`std::partial_sort` / `std::nth_element`, replicated)
                let mags: Vec<f32> = var.iter().map(|v| v.abs()).collect();
                crate::torch_sort::topk_largest_mask(&mags, kk)
            };
            for t in &mut tv {
                for (v, m) in t.iter_mut().zip(&mask) {
                    if !*m {
                        *v = 0.0;
                    }
                }
            }
        }
        let s: Vec<f32> = tv
            .iter()
            .map(|t| r((sum_by(n, |i| r(t[i] * t[i]) as f64) / n as f64) as f32))
            .collect();
        let total = r(s.iter().map(|v| *v as f64).sum::<f64>() as f32) as f64;
        let omega: Vec<f32> = if total.abs() < 1e-6 {
            vec![r(1.0 / k as f32); k]
        } else {
            s.iter().map(|v| r((*v as f64 / total) as f32)).collect()
        };
        let out = map_n(n, |i| {
            let mut sum = 0.0f32;
            for t in &tv {
                sum += t[i];
            }
            let majority = if r(sum) >= 0.0 { 1.0 } else { -1.0 };
            let mut merged = 0.0f32;
            let mut den = 0.0f32;
            for (t, w) in tv.iter().zip(&omega) {
                if sign(t[i]) == majority {
                    merged += r(t[i] * w);
                    den += w;
                }
            }
            let den = r(den).max(r(1e-6));
            r(base.data[i] + r(r(merged) / den))
        });
        Ok(Tensor::new(base.shape.clone(), out, dt))
    }
}

/// Methods whose base tensor is a separate, required argument.
pub fn base_present(cx: &ShapeCtx) -> Result<()> {
    if cx.base.is_none() {
        return Err(Error::tensor(
            cx.name,
            "base model tensor required but not present",
        ));
    }
    Ok(())
}
