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
        vec![ParamSpec::flag("filter_wise", false)]
    }
    fn base_use(&self) -> BaseUse {
        BaseUse::Required
    }
    fn input_counts(&self) -> InputCounts {
        InputCounts {
            min_inputs: 3,
            ..InputCounts::default()
        }
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
                let den = r(1.0 + r((nf - 1.0) * c));
                // mergekit 0.1.5: at the singularity (opposing updates)
                // keep the base
                if den.abs() < 1e-6 {
                    0.0
                } else {
                    r(r(nf * c) / den)
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opposing_updates_keep_the_base() {
        // cos θ = −1 with two fine-tunes: 1 + (N−1)·cos = 0. mergekit 0.1.5
        // keeps the base there (0.1.4 divided by ~0 and gave NaN/inf).
        let base = Tensor::new(vec![4], vec![0.5, -1.0, 2.0, 0.25], DType::F32);
        let d = [0.1f32, 0.2, -0.3, 0.4];
        let up = Tensor::new(
            vec![4],
            (0..4).map(|i| base.data[i] + d[i]).collect(),
            DType::F32,
        );
        let down = Tensor::new(
            vec![4],
            (0..4).map(|i| base.data[i] - d[i]).collect(),
            DType::F32,
        );
        let g: ParamValues = [("filter_wise".to_string(), 0.0)].into();
        let none = ParamValues::new();
        let job = MergeJob {
            name: "t",
            tensors: vec![base.clone(), up, down],
            base: Some(0),
            global: &g,
            per_model: vec![&none, &none, &none],
            is_embed: false,
            seed: 0,
        };
        let out = ModelStock.merge(job).unwrap();
        assert!(out.data.iter().all(|x| x.is_finite()), "{:?}", out.data);
        for (o, b) in out.data.iter().zip(&base.data) {
            assert!((o - b).abs() < 1e-6, "{:?}", out.data);
        }
    }
}
