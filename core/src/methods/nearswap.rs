//! `nearswap`: take the other model's value where it is within `t` of the
//! base, interpolate toward the base elsewhere (spec §4.11).

use super::sce::base_present;
use super::*;

pub struct NearSwap;

impl MergeMethod for NearSwap {
    fn name(&self) -> &'static str {
        "nearswap"
    }
    fn pretty_name(&self) -> &'static str {
        "NearSwap"
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::required("t")]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }
    fn input_counts(&self) -> InputCounts {
        InputCounts::exactly(2)
    }
    fn row_separable(&self, _global: &ParamValues, _per_model: &[ParamValues]) -> bool {
        true
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        base_present(cx)?;
        if cx.shapes.len() > 2 {
            return Err(Error::tensor(
                cx.name,
                format!(
                    "nearswap expects exactly one model besides the base, got {}",
                    cx.shapes.len() - 1
                ),
            ));
        }
        equal_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        let name = job.name;
        let t = job.global("t") as f32;
        let (a, xs, _) = job.split_base().ok_or_else(|| {
            Error::tensor(name, "nearswap: base model tensor required but not present")
        })?;
        let Some(b) = xs.first() else { return Ok(a) };
        let dt = a.dtype;
        let r = |x: f32| dt.round(x);
        let out = map_n(a.numel(), |i| {
            let d = r(r(a.data[i] - b.data[i]).abs()).max(r(1e-6));
            // torch evaluates `t / d` (scalar / tensor) as reciprocal(d) · t
            let w = r(r(1.0 / d) * t).clamp(0.0, 1.0);
            r(r(w * b.data[i]) + r(r(1.0 - w) * a.data[i]))
        });
        Ok(Tensor::new(a.shape.clone(), out, dt))
    }
}
