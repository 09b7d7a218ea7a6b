//! `slerp`: spherical interpolation between the base and one other model,
//! over the whole tensor as one vector, computed in f32 like mergekit's numpy
//! code (spec §4.2).

use super::*;

pub struct Slerp;

const DOT_THRESHOLD: f32 = 0.9995;

impl MergeMethod for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
    }
    fn pretty_name(&self) -> &'static str {
        "SLERP"
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://en.wikipedia.org/wiki/Slerp")
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::required("t")]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        if cx.shapes.len() == 1 {
            return Ok(ShapePlan::all(cx.shapes[0].clone(), 1));
        }
        if cx.shapes.len() != 2 {
            return Err(Error::tensor(
                cx.name,
                format!(
                    "slerp merge expects exactly two models, got {}",
                    cx.shapes.len()
                ),
            ));
        }
        if cx.base.is_none() {
            return Err(Error::tensor(
                cx.name,
                "slerp: base model not in input tensors",
            ));
        }
        rectified_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        if job.tensors.len() == 1 {
            return Ok(job.tensors.pop().expect("one"));
        }
        let t = job.global("t");
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
        let name = job.name;
        let (v0, others, _) = job
            .split_base()
            .ok_or_else(|| Error::tensor(name, "slerp: base model not in input tensors"))?;
        let v1 = &others[0];
        let data = slerp(t, &v0.data, &v1.data);
        Ok(Tensor::new(shape, data, v0.dtype).cast(dt))
    }
}

/// mergekit's numpy slerp in f32: returns f32 values.
pub fn slerp(t: f64, v0: &[f32], v1: &[f32]) -> Vec<f32> {
    let eps = 1e-8f32;
    let n0 = norm(v0);
    let n1 = norm(v1);
    let s0 = if n0 > eps { n0 } else { 1.0 };
    let s1 = if n1 > eps { n1 } else { 1.0 };
    let dot = sum_by(v0.len(), |i| ((v0[i] / s0) * (v1[i] / s1)) as f64) as f32;
    if dot.abs() > DOT_THRESHOLD {
        let a = (1.0 - t) as f32;
        let b = t as f32;
        return map_n(v0.len(), |i| a * v0[i] + b * v1[i]);
    }
    let theta0 = dot.acos();
    let sin0 = theta0.sin();
    let theta_t = theta0 * t as f32;
    let sin_t = theta_t.sin();
    let c0 = (theta0 - theta_t).sin() / sin0;
    let c1 = sin_t / sin0;
    map_n(v0.len(), |i| c0 * v0[i] + c1 * v1[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn endpoints(a in proptest::collection::vec(-10f32..10.0, 2..40), seed in 0u32..1000) {
            let b: Vec<f32> = a.iter().enumerate().map(|(i, x)| x * ((i as u32 * 7 + seed) % 5) as f32 - 1.0).collect();
            prop_assert_eq!(slerp(0.0, &a, &b), a.clone());
            let r1 = slerp(1.0, &a, &b);
            for (x, y) in r1.iter().zip(&b) {
                prop_assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{} vs {}", x, y);
            }
        }
    }

    #[test]
    fn orthogonal_halfway() {
        let r = slerp(0.5, &[1.0, 0.0], &[0.0, 1.0]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((r[0] - h).abs() < 1e-6 && (r[1] - h).abs() < 1e-6, "{r:?}");
    }
}
