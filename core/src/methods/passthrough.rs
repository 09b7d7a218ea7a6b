//! `passthrough`: copy the single input, optionally scaled (spec §4.13).

use super::*;

pub struct Passthrough;

impl MergeMethod for Passthrough {
    fn name(&self) -> &'static str {
        "passthrough"
    }
    fn pretty_name(&self) -> &'static str {
        "Passthrough"
    }
    fn model_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::optional("scale")]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Unused
    }
    fn input_counts(&self) -> InputCounts {
        InputCounts {
            max_inputs: Some(1),
            ..InputCounts::default()
        }
    }
    fn row_separable(&self, _global: &ParamValues, _per_model: &[ParamValues]) -> bool {
        true
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        if cx.shapes.len() != 1 {
            return Err(Error::tensor(
                cx.name,
                format!(
                    "passthrough merge expects exactly one tensor, got {}",
                    cx.shapes.len()
                ),
            ));
        }
        Ok(ShapePlan::all(cx.shapes[0].clone(), 1))
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        if job.tensors.len() != 1 {
            return Err(job.err("passthrough merge expects exactly one tensor"));
        }
        let scale = job.model_param(0, "scale");
        let mut t = job.tensors.pop().expect("one tensor");
        if let Some(s) = scale {
            let dt = t.dtype;
            let s = s as f32;
            for v in &mut t.data {
                *v = dt.round(*v * s);
            }
        }
        Ok(t)
    }
}
