//! `model_stock`: interpolate between the average of the fine-tunes and the
//! base by a ratio derived from the angle between their offsets (spec §4.10).

use super::*;

pub struct ModelStock;

impl MergeMethod for ModelStock {
    fn name(&self) -> &'static str {
        "model_stock"
    }
    fn pretty_name(&self) -> &'static str {
        "Model Stock"
    }
    fn reference_url(&self) -> Option<&'static str> {
        Some("https://arxiv.org/abs/2403.19522")
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::default("filter_wise", 0.0)]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        let n = cx.shapes.len();
        if n == 1 && cx.base == Some(0) {
            return Ok(ShapePlan::all(cx.shapes[0].clone(), 1));
        }
        if n < 3 {
            if cx.optional {
                return Ok(ShapePlan::Skip(format!(
                    "{}: model_stock needs at least 3 models (base + 2), got {n}; optional weight skipped",
                    cx.name
                )));
            }
            return Err(Error::tensor(
                cx.name,
                format!("model_stock requires at least 3 models (base + 2), got {n}"),
            ));
        }
        if cx.base.is_none() {
            return Err(Error::tensor(
                cx.name,
                "model_stock: base model tensor not found",
            ));
        }
        rectified_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        let name = job.name;
        if job.tensors.len() == 1 {
            return Ok(job.tensors.pop().expect("one"));
        }
        let ShapePlan::Output { shape, .. } = rectified_shape(&ShapeCtx {
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
        let filter_wise = job.flag("filter_wise");
        let (w0, ws, _) = job
            .split_base()
            .ok_or_else(|| Error::tensor(name, "model_stock: base model tensor not found"))?;
        let dt = w0.dtype;
        let r = |x: f32| dt.round(x);
        let n = w0.numel();
        let len = if filter_wise { w0.last_dim() } else { n };
        let rows = n / len.max(1);
        let offsets: Vec<Vec<f32>> = ws
            .iter()
            .map(|w| map_n(n, |i| r(w.data[i] - w0.data[i])))
            .collect();
        let nn = ws.len();
        // mean pairwise cosine, per row (filter-wise) or over the whole tensor
        let mut cos_sum = vec![0.0f32; rows];
        let mut pairs = 0usize;
        for i in 0..nn {
            for j in i + 1..nn {
                let (a, b) = (&offsets[i], &offsets[j]);
                for (row, cs) in cos_sum.iter_mut().enumerate() {
                    let lo = row * len;
                    let na = r(norm(&a[lo..lo + len]));
                    let nb = r(norm(&b[lo..lo + len]));
                    let dot = if len == n {
                        sum_by(n, |k| r(a[k] * b[k]) as f64) as f32
                    } else {
                        (lo..lo + len).map(|k| r(a[k] * b[k]) as f64).sum::<f64>() as f32
                    };
                    let c = r(r(dot) / r(na * nb).max(r(1e-6))).clamp(-1.0, 1.0);
                    *cs += c;
                }
                pairs += 1;
            }
        }
        let nf = nn as f32;
        let t: Vec<f32> = cos_sum
            .iter()
            .map(|s| {
                let c = r(s / pairs as f32);
                r(r(nf * c) / r(1.0 + r((nf - 1.0) * c)))
            })
            .collect();
        // python's sum(ws): sequential adds, each rounded
        let mut avg = ws[0].data.clone();
        for w in &ws[1..] {
            let prev = avg;
            avg = map_n(n, |i| r(prev[i] + w.data[i]));
        }
        let out = map_n(n, |i| {
            let tt = t[i / len.max(1)];
            let a = r(avg[i] / nf);
            r(r(tt * a) + r(r(1.0 - tt) * w0.data[i]))
        });
        Ok(Tensor::new(shape, out, dt))
    }
}
