//! `karcher`: the Riemannian (Karcher) mean of the models on the sphere,
//! equal weights, norms in f32 (spec §4.5).

use super::*;

pub struct Karcher;

impl MergeMethod for Karcher {
    fn name(&self) -> &'static str {
        "karcher"
    }
    fn pretty_name(&self) -> &'static str {
        "Karcher Mean"
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://arxiv.org/abs/2603.04972")
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::int("max_iter", 10),
            ParamSpec::default("tol", 1e-5),
        ]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Unused
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        // mergekit's embedding rectification is a no-op here: shapes must match.
        equal_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        if job.tensors.len() == 1 {
            return Ok(job.tensors.pop().expect("one"));
        }
        let dt = job.dtype();
        let r = |x: f32| dt.round(x);
        let max_iter = job.global("max_iter").max(0.0) as usize;
        let tol = job.global("tol");
        let xs = std::mem::take(&mut job.tensors);
        let shape = xs[0].shape.clone();
        let n = xs[0].numel();
        let k = xs.len();
        let alphas: Vec<f64> = vec![1.0 / k as f64; k];
        let norms: Vec<f64> = xs.iter().map(|x| norm(&x.data) as f64).collect();
        let units: Vec<Vec<f32>> = xs
            .iter()
            .zip(&norms)
            .map(|(x, nn)| {
                if *nn == 0.0 {
                    vec![0.0; n]
                } else {
                    let d = *nn as f32;
                    map_n(n, |i| r(x.data[i] / d))
                }
            })
            .collect();
        let valid: Vec<usize> = (0..k).filter(|i| norms[*i] > tol).collect();
        if valid.is_empty() {
            return Ok(Tensor::zeros(&shape, dt));
        }
        let asum: f64 = valid.iter().map(|i| alphas[*i]).sum();
        let na: Vec<f64> = valid.iter().map(|i| alphas[*i] / asum).collect();
        let vu: Vec<&Vec<f32>> = valid.iter().map(|i| &units[*i]).collect();
        let mut u = vec![0.0f32; n];
        for (a, ui) in na.iter().zip(&vu) {
            let a = *a as f32;
            let prev = u.clone();
            u = map_n(n, |i| r(prev[i] + r(a * ui[i])));
        }
        let nu = norm(&u) as f64;
        if nu < tol {
            u = vu[0].clone();
        } else {
            let d = nu as f32;
            u = map_n(n, |i| r(u[i] / d));
        }
        for _ in 0..max_iter {
            let mut tvec = vec![0.0f32; n];
            for (a, ui) in na.iter().zip(&vu) {
                let dot = r(sum_by(n, |i| (u[i] as f64) * (ui[i] as f64)) as f32).clamp(-1.0, 1.0);
                let theta = r(dot.acos());
                if (theta as f64) < tol {
                    continue;
                }
                let coef = r(r(theta / r(theta.sin())) * *a as f32);
                let prev = tvec.clone();
                tvec = map_n(n, |i| r(prev[i] + r(coef * r(ui[i] - r(dot * u[i])))));
            }
            let nt = norm(&tvec) as f64;
            if nt < tol {
                break;
            }
            let c = r(nt.cos() as f32);
            let s = r(nt.sin() as f32);
            let ntf = nt as f32;
            u = map_n(n, |i| r(r(c * u[i]) + r(s * r(tvec[i] / ntf))));
            let un = norm(&u);
            if (un as f64) > tol {
                u = map_n(n, |i| r(u[i] / un));
            }
        }
        let s: f64 = alphas.iter().zip(&norms).map(|(a, nn)| a * nn).sum();
        let s = s as f32;
        Ok(Tensor::new(shape, map_n(n, |i| r(s * u[i])), dt))
    }
}
