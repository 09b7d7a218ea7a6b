//! `multislerp`: weighted spherical average of several models (or of their
//! task vectors when a base is given), in the working dtype (spec §4.4).

use super::*;

pub struct MultiSlerp;

impl MergeMethod for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }
    fn pretty_name(&self) -> &'static str {
        "Multi-SLERP"
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::flag("normalize_weights", true),
            ParamSpec::default("eps", 1e-8),
        ]
    }
    fn model_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::required("weight")]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Optional
    }
    fn input_counts(&self) -> InputCounts {
        InputCounts {
            min_non_base: 1,
            ..InputCounts::default()
        }
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        equal_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        let dt = job.dtype();
        let r = |x: f32| dt.round(x);
        let eps = job.global("eps") as f32;
        let normalize = job.flag("normalize_weights");
        let name = job.name;
        let base_idx = job.base;
        let mut w: Vec<f32> = Vec::new();
        for i in 0..job.tensors.len() {
            if Some(i) == base_idx {
                continue;
            }
            let v = job
                .model_param(i, "weight")
                .ok_or_else(|| Error::tensor(name, "multislerp: a model has no `weight`"))?;
            w.push(r(v as f32));
        }
        let (base, xs) = match job.split_base() {
            Some((b, o, _)) => (Some(b), o),
            None => (None, std::mem::take(&mut job.tensors)),
        };
        let Some(shape) = xs.first().map(|x| x.shape.clone()) else {
            // only the base has this (optional) tensor: it passes through
            return base.ok_or_else(|| Error::tensor(name, "multislerp: no input tensor"));
        };
        if xs.len() == 1 {
            return Ok(xs.into_iter().next().expect("one"));
        }
        let n = xs[0].numel();
        let xs: Vec<Vec<f32>> = match &base {
            Some(b) => xs
                .iter()
                .map(|x| map_n(n, |i| r(x.data[i] - b.data[i])))
                .collect(),
            None => xs.into_iter().map(|x| x.data).collect(),
        };
        if normalize {
            let s = r(w.iter().sum::<f32>());
            for v in &mut w {
                *v = r(*v / s);
            }
        }
        let norms: Vec<f32> = xs.iter().map(|x| r(norm(x))).collect();
        let units: Vec<Vec<f32>> = xs
            .iter()
            .zip(&norms)
            .map(|(x, nn)| {
                let d = r(nn + eps);
                map_n(n, |i| r(x[i] / d))
            })
            .collect();
        let weighted_sum = |vs: &[Vec<f32>]| -> Vec<f32> {
            map_n(n, |i| {
                let mut acc = 0.0f32;
                for (v, wk) in vs.iter().zip(&w) {
                    acc += r(v[i] * wk);
                }
                r(acc)
            })
        };
        let mean = weighted_sum(&units);
        let mean_norm = r(norm(&mean));
        let add_base = |v: Vec<f32>| -> Vec<f32> {
            match &base {
                Some(b) => map_n(n, |i| r(v[i] + b.data[i])),
                None => v,
            }
        };
        if mean_norm < r(eps) {
            if xs.len() == 2 {
                let res = map_n(n, |i| r(r(xs[0][i] * w[0]) + r(xs[1][i] * w[1])));
                return Ok(Tensor::new(shape, add_base(res), dt));
            }
            return Err(Error::tensor(
                name,
                "multislerp: inputs are antipodal (weighted mean of unit vectors is ~0)",
            ));
        }
        let mean: Vec<f32> = map_n(n, |i| r(mean[i] / mean_norm));
        let dots: Vec<f32> = units
            .iter()
            .map(|u| {
                let mut acc = 0.0f64;
                for i in 0..n {
                    acc += r(u[i] * mean[i]) as f64;
                }
                r(acc as f32)
            })
            .collect();
        let tangents: Vec<Vec<f32>> = units
            .iter()
            .zip(&dots)
            .map(|(u, d)| map_n(n, |i| r(u[i] - r(d * mean[i]))))
            .collect();
        let tmean = weighted_sum(&tangents);
        let tnorm = r(r(norm(&tmean)) + eps);
        let c = r(tnorm.cos());
        let s = r(r(tnorm.sin()) / tnorm);
        let mut avg_norm = 0.0f32;
        for (nn, wk) in norms.iter().zip(&w) {
            avg_norm += r(nn * wk);
        }
        let avg_norm = r(avg_norm);
        let res = map_n(n, |i| r(r(r(mean[i] * c) + r(tmean[i] * s)) * avg_norm));
        Ok(Tensor::new(shape, add_base(res), dt))
    }
}
