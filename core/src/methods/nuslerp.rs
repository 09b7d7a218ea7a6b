//! `nuslerp`: slerp between two models (or their task vectors), per row,
//! per column or flattened, in the working dtype (spec §4.3).

use super::*;

pub struct NuSlerp;

/// How a tensor is cut into the vectors that are interpolated.
#[derive(Debug, Clone, Copy)]
pub enum VecLayout {
    /// The whole tensor is one vector.
    Flat { len: usize },
    /// Vectors run along the last axis (rows of a 2-D weight).
    LastAxis { len: usize },
    /// Vectors run along axis 0 (columns of a 2-D weight); `stride` is the
    /// product of the other axes.
    FirstAxis { len: usize, stride: usize },
}

impl VecLayout {
    pub fn for_shape(shape: &[usize], flatten: bool, row_wise: bool) -> VecLayout {
        let n: usize = shape.iter().product();
        if flatten || shape.len() <= 1 {
            VecLayout::Flat { len: n }
        } else if row_wise {
            VecLayout::FirstAxis {
                len: shape[0],
                stride: n / shape[0].max(1),
            }
        } else {
            VecLayout::LastAxis {
                len: shape[shape.len() - 1],
            }
        }
    }
    pub fn count(&self, n: usize) -> usize {
        match *self {
            VecLayout::Flat { .. } => 1,
            VecLayout::LastAxis { len } => n / len.max(1),
            VecLayout::FirstAxis { stride, .. } => stride,
        }
    }
    pub fn vector_len(&self) -> usize {
        match *self {
            VecLayout::Flat { len }
            | VecLayout::LastAxis { len }
            | VecLayout::FirstAxis { len, .. } => len,
        }
    }
    /// Flat index of element `pos` of vector `v`.
    #[inline(always)]
    pub fn index(&self, v: usize, pos: usize) -> usize {
        match *self {
            VecLayout::Flat { .. } => pos,
            VecLayout::LastAxis { len } => v * len + pos,
            VecLayout::FirstAxis { stride, .. } => pos * stride + v,
        }
    }
    /// Which vector a flat index belongs to.
    #[inline(always)]
    pub fn vector_of(&self, i: usize) -> usize {
        match *self {
            VecLayout::Flat { .. } => 0,
            VecLayout::LastAxis { len } => i / len,
            VecLayout::FirstAxis { stride, .. } => i % stride,
        }
    }
}

impl MergeMethod for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }
    fn pretty_name(&self) -> &'static str {
        "NuSLERP"
    }
    fn global_params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::flag("nuslerp_flatten", true),
            ParamSpec::flag("nuslerp_row_wise", false),
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
            min_non_base: 2,
            max_non_base: Some(2),
            ..InputCounts::default()
        }
    }
    fn row_separable(&self, global: &ParamValues, _per_model: &[ParamValues]) -> bool {
        // per-row vectors (the last axis) only
        global.get("nuslerp_flatten").is_some_and(|v| *v == 0.0)
            && global.get("nuslerp_row_wise").is_none_or(|v| *v == 0.0)
    }
    fn plan_shapes(&self, cx: &ShapeCtx) -> Result<ShapePlan> {
        let n = cx.shapes.len();
        if n == 1 {
            return Ok(ShapePlan::all(cx.shapes[0].clone(), 1));
        }
        let want = if cx.base.is_some() { 3 } else { 2 };
        if n != want {
            let msg = if cx.base.is_some() {
                "nuslerp expects exactly two models plus a distinct base model"
            } else {
                "nuslerp expects exactly two models"
            };
            return Err(Error::tensor(cx.name, format!("{msg}, got {n} inputs")));
        }
        rectified_shape(cx)
    }
    fn merge(&self, mut job: MergeJob) -> Result<Tensor> {
        if job.tensors.len() == 1 {
            return Ok(job.tensors.pop().expect("one"));
        }
        let dt = job.dtype();
        let ShapePlan::Output { shape, .. } = self.plan_shapes(&ShapeCtx {
            name: job.name,
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
        let flatten = job.flag("nuslerp_flatten");
        let row_wise = job.flag("nuslerp_row_wise");
        let name = job.name;
        let weights: Vec<f64> = (0..job.tensors.len())
            .filter(|i| Some(*i) != job.base)
            .map(|i| {
                job.model_param(i, "weight")
                    .ok_or_else(|| Error::tensor(name, "nuslerp: a model has no `weight`"))
            })
            .collect::<Result<_>>()?;
        let wsum = weights[0] + weights[1];
        let t = if wsum.abs() < 1e-6 {
            0.5
        } else {
            weights[1] / wsum
        };
        let layout = VecLayout::for_shape(&shape, flatten, row_wise);
        let out = match job.split_base() {
            Some((base, others, _)) => {
                let d0 = map_n(base.numel(), |i| dt.round(others[0].data[i] - base.data[i]));
                let d1 = map_n(base.numel(), |i| dt.round(others[1].data[i] - base.data[i]));
                let s = nuslerp(t, &d0, &d1, layout, dt);
                map_n(base.numel(), |i| dt.round(base.data[i] + s[i]))
            }
            None => nuslerp(t, &job.tensors[0].data, &job.tensors[1].data, layout, dt),
        };
        Ok(Tensor::new(shape, out, dt))
    }
}

/// Per-vector slerp in the working dtype `dt` (each op rounded).
pub fn nuslerp(t: f64, v0: &[f32], v1: &[f32], layout: VecLayout, dt: DType) -> Vec<f32> {
    let n = v0.len();
    let count = layout.count(n);
    let len = layout.vector_len();
    let r = |x: f32| dt.round(x);
    let vnorm = |v: &[f32], k: usize| -> f32 {
        let mut s = 0.0f64;
        for p in 0..len {
            let x = v[layout.index(k, p)] as f64;
            s += x * x;
        }
        r(s.sqrt() as f32)
    };
    let eps_n = r(1e-7);
    let a = (1.0 - t) as f32;
    let b = t as f32;
    // Per-vector coefficients: (sin((1-t)θ), sin(tθ), sin θ, colinear)
    let coef: Vec<(f32, f32, f32, bool)> = {
        use rayon::prelude::*;
        (0..count)
            .into_par_iter()
            .map(|k| {
                let n0 = vnorm(v0, k).max(eps_n);
                let n1 = vnorm(v1, k).max(eps_n);
                // torch sums f32 with blocked (accurate) accumulation: use f64
                let mut c = 0.0f64;
                for p in 0..len {
                    let i = layout.index(k, p);
                    c += r(r(v0[i] / n0) * r(v1[i] / n1)) as f64;
                }
                let cos = r(c as f32).clamp(-1.0, 1.0);
                let theta = r(cos.acos());
                let sin_theta = r(theta.sin());
                let s0 = r(r(a * theta).sin());
                let s1 = r(r(b * theta).sin());
                // mergekit 0.1.5: colinear when 1 − cos² ≤ eps² (eps 1e-8),
                // antiparallel vectors included (sin π is not 0 in f32)
                let colinear = r(1.0 - r(cos * cos)) <= 1e-16f32;
                (s0, s1, sin_theta, colinear)
            })
            .collect()
    };
    map_n(n, |i| {
        let (s0, s1, st, colinear) = coef[layout.vector_of(i)];
        if colinear {
            r(r(a * v0[i]) + r(b * v1[i]))
        } else {
            r(r(r(s0 * v0[i]) + r(s1 * v1[i])) / st)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_index_consistently() {
        let l = VecLayout::for_shape(&[3, 4], false, true);
        assert_eq!(l.count(12), 4);
        assert_eq!(l.index(1, 2), 2 * 4 + 1);
        assert_eq!(l.vector_of(9), 1);
        let l = VecLayout::for_shape(&[3, 4], false, false);
        assert_eq!(l.count(12), 3);
        assert_eq!(l.vector_of(9), 2);
    }

    #[test]
    fn antiparallel_vectors_interpolate_linearly() {
        // mergekit 0.1.5 treats cos θ = −1 as colinear: (1−t)·a + t·b
        // (rows whose unit vectors and dot products are exact in f32)
        let a = [1.0f32, 0.0, 0.0, -2.0];
        let b: Vec<f32> = a.iter().map(|x| -x).collect();
        let l = VecLayout::for_shape(&[2, 2], false, false);
        let out = nuslerp(0.25, &a, &b, l, DType::F32);
        for i in 0..4 {
            assert_eq!(out[i], 0.75 * a[i] + 0.25 * b[i], "{out:?}");
        }
    }

    #[test]
    fn t_zero_and_one_return_endpoints() {
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [4.0f32, -1.0, 0.5, 2.0];
        let l = VecLayout::for_shape(&[2, 2], false, false);
        let r0 = nuslerp(0.0, &a, &b, l, DType::F32);
        let r1 = nuslerp(1.0, &a, &b, l, DType::F32);
        for i in 0..4 {
            assert!((r0[i] - a[i]).abs() < 1e-5, "{r0:?}");
            assert!((r1[i] - b[i]).abs() < 1e-5, "{r1:?}");
        }
    }
}
