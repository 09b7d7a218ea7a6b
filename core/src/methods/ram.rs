//! `ram` and `ramplus_tl` (Reinforced Agent Merging, spec §4.9): positions
//! changed by one model keep that change; positions changed by several get
//! the average; ramplus_tl boosts unique contributions by overlap ratio.

use super::sce::base_present;
use super::*;

pub struct Ram {
    pub plus: bool,
}

impl MergeMethod for Ram {
    fn name(&self) -> &'static str {
        if self.plus { "ramplus_tl" } else { "ram" }
    }
    fn pretty_name(&self) -> &'static str {
        if self.plus {
            "Reinforced Agent Merging Plus (Tensor-Local)"
        } else {
            "Reinforced Agent Merging"
        }
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://arxiv.org/abs/2601.13572")
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        let mut v = vec![ParamSpec::default("epsilon", 1e-5)];
        if self.plus {
            v.push(ParamSpec::default("r", 0.1));
            v.push(ParamSpec::default("alpha", 0.2));
        }
        v
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }
    fn output_dtype(&self, working: DType) -> DType {
        if self.plus { DType::F32 } else { working }
    }
    fn row_separable(&self, _global: &ParamValues, _per_model: &[ParamValues]) -> bool {
        !self.plus
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        base_present(cx)?;
        equal_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        let name = job.name;
        let eps_raw = job.global("epsilon") as f32;
        let rr = if self.plus { job.global("r") } else { 0.0 };
        let alpha = if self.plus { job.global("alpha") } else { 0.0 };
        let (base, xs, _) = job.split_base().ok_or_else(|| {
            Error::tensor(name, "ram: base model tensor required but not present")
        })?;
        if xs.is_empty() {
            return Ok(base);
        }
        let dt = base.dtype;
        let r = |x: f32| dt.round(x);
        // `|tv| > epsilon` compares against epsilon in the working dtype
        let eps = r(eps_raw);
        let n = base.numel();
        let tv: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| map_n(n, |i| r(x.data[i] - base.data[i])))
            .collect();
        let count = |i: usize| tv.iter().filter(|t| t[i].abs() > eps).count();
        let lambdas: Vec<f32> = if self.plus {
            tv.iter()
                .map(|t| {
                    let shared = sum_by(n, |i| (t[i].abs() > eps && count(i) > 1) as u8 as f64);
                    let unique = sum_by(n, |i| (t[i].abs() > eps && count(i) == 1) as u8 as f64);
                    let rho = shared as f32 / (unique as f32).max(eps_raw);
                    (1.0 + rr * (rho.clamp(0.0, alpha as f32)) as f64) as f32
                })
                .collect()
        } else {
            vec![1.0; tv.len()]
        };
        let plus = self.plus;
        let out = map_n(n, |i| {
            let c = count(i);
            let mut m = 0.0f32;
            for (t, l) in tv.iter().zip(&lambdas) {
                if t[i].abs() > eps {
                    if c == 1 {
                        // ramplus_tl: λ is a float32 tensor, so this (and
                        // everything after it) is computed in f32
                        m += if plus { t[i] * l } else { t[i] };
                    } else {
                        m += r(t[i] / c as f32);
                    }
                }
            }
            if plus {
                base.data[i] + m
            } else {
                r(base.data[i] + r(m))
            }
        });
        let odt = if plus { DType::F32 } else { dt };
        Ok(Tensor::new(base.shape.clone(), out, odt))
    }
}
