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
    fn input_counts(&self) -> InputCounts {
        InputCounts::exactly(2)
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
    fn stream_align(
        &self,
        _shape: &[usize],
        _global: &ParamValues,
        _per_model: &[ParamValues],
    ) -> Option<usize> {
        Some(BLOCK)
    }
    /// Two passes over the inputs: the norms and dot product, then the
    /// output — partial sums per [`BLOCK`] in block order, exactly as
    /// [`slerp`]'s, so the bytes are those of the whole-tensor merge.
    fn merge_streamed(
        &self,
        job: stream::StreamJob,
        src: &dyn stream::BlockSource,
        emit: stream::Emit,
    ) -> Result<()> {
        use stream::{block_size, for_blocks, total};
        let n = job.numel();
        let block = block_size(job.block, BLOCK);
        if job.n_inputs == 1 {
            return for_blocks(n, block, |s, _, e0, e1| {
                s.ensure(1);
                src.read(0, e0, e1, &mut s.bufs[0])?;
                emit(e0, &s.bufs[0])
            })
            .map(|_| ());
        }
        if job.n_inputs != 2 {
            return Err(job.err(format!(
                "slerp merge expects exactly two models, got {}",
                job.n_inputs
            )));
        }
        let b0 = job
            .base
            .ok_or_else(|| job.err("slerp: base model not in input tensors"))?;
        let b1 = 1 - b0;
        let t = job.global("t");
        // pass 1: squared norms and the dot product
        let parts = for_blocks(n, block, |s, _, e0, e1| {
            s.ensure(2);
            let (x, rest) = s.bufs.split_at_mut(1);
            src.read(b0, e0, e1, &mut x[0])?;
            src.read(b1, e0, e1, &mut rest[0])?;
            Ok(x[0]
                .chunks(BLOCK)
                .zip(rest[0].chunks(BLOCK))
                .map(|(a, b)| crate::simd::sq_dot(a, b))
                .collect::<Vec<_>>())
        })?;
        let sum = |f: fn(&(f64, f64, f64)) -> f64| total(parts.iter().flatten().map(f));
        let (c0, c1) = coefficients(t, stats(sum(|p| p.0), sum(|p| p.1), sum(|p| p.2)));
        // pass 2: the output
        for_blocks(n, block, |s, _, e0, e1| {
            s.ensure(2);
            let (x, rest) = s.bufs.split_at_mut(1);
            src.read(b0, e0, e1, &mut x[0])?;
            src.read(b1, e0, e1, &mut rest[0])?;
            let (v0, v1) = (&x[0], &rest[0]);
            // every element is written
            s.out.truncate(v0.len());
            s.out.resize(v0.len(), 0.0);
            crate::simd::lerp2(&mut s.out, v0, v1, c0, c1);
            emit(e0, &s.out)
        })
        .map(|_| ())
    }
}

/// The interpolation coefficients of `v0` and `v1` for the dot product of
/// their normalised vectors: linear when they are nearly colinear.
fn coefficients(t: f64, dot: f32) -> (f32, f32) {
    if dot.abs() > DOT_THRESHOLD {
        return ((1.0 - t) as f32, t as f32);
    }
    let theta0 = dot.acos();
    let sin0 = theta0.sin();
    let theta_t = theta0 * t as f32;
    let sin_t = theta_t.sin();
    ((theta0 - theta_t).sin() / sin0, sin_t / sin0)
}

/// The dot product of the normalised vectors from Σv0², Σv1² and Σv0·v1:
/// mergekit divides each vector by its norm (when above 1e-8) first; here
/// the f64 dot product is divided by the norms instead (one statistics pass
/// when streamed).
fn stats(sq0: f64, sq1: f64, dot: f64) -> f32 {
    let eps = 1e-8f32;
    let (n0, n1) = (sq0.sqrt() as f32, sq1.sqrt() as f32);
    let s0 = if n0 > eps { n0 } else { 1.0 };
    let s1 = if n1 > eps { n1 } else { 1.0 };
    (dot / (s0 as f64 * s1 as f64)) as f32
}

/// mergekit's numpy slerp in f32: returns f32 values.
pub fn slerp(t: f64, v0: &[f32], v1: &[f32]) -> Vec<f32> {
    let parts: Vec<(f64, f64, f64)> = v0
        .par_chunks(BLOCK)
        .zip(v1.par_chunks(BLOCK))
        .map(|(a, b)| crate::simd::sq_dot(a, b))
        .collect();
    let sum = |f: fn(&(f64, f64, f64)) -> f64| parts.iter().map(f).sum::<f64>();
    let (c0, c1) = coefficients(t, stats(sum(|p| p.0), sum(|p| p.1), sum(|p| p.2)));
    let mut out = vec![0f32; v0.len()];
    out.par_chunks_mut(BLOCK)
        .zip(v0.par_chunks(BLOCK).zip(v1.par_chunks(BLOCK)))
        .for_each(|(o, (a, b))| crate::simd::lerp2(o, a, b, c0, c1));
    out
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

    /// The streamed merge equals the whole-tensor one bit for bit, across
    /// block boundaries, for every float working dtype, with the base first
    /// or second, nearly colinear inputs (the linear branch) and one input.
    #[test]
    fn streamed_equals_whole() {
        use std::sync::Mutex;
        struct Src(Vec<Vec<f32>>);
        impl stream::BlockSource for Src {
            fn read(&self, i: usize, e0: usize, e1: usize, out: &mut Vec<f32>) -> Result<()> {
                out.clear();
                out.extend_from_slice(&self.0[i][e0..e1]);
                Ok(())
            }
        }
        let global: ParamValues = [("t".to_string(), 0.3)].into();
        let pm = [ParamValues::new(), ParamValues::new()];
        for dt in [DType::BF16, DType::F16, DType::F32] {
            for shape in [vec![100usize, 512], vec![2 * BLOCK + 123]] {
                for (colinear, base, inputs) in
                    [(false, 0, 2), (true, 0, 2), (false, 1, 2), (false, 0, 1)]
                {
                    let n: usize = shape.iter().product();
                    let data: Vec<Vec<f32>> = (0..inputs)
                        .map(|m| {
                            (0..n)
                                .map(|i| {
                                    let x = ((i * 7919 + 13) % 1000) as f32 / 1000.0 - 0.5;
                                    let y = ((i * 104_729 + m * 31) % 997) as f32 / 997.0 - 0.5;
                                    dt.round(if colinear {
                                        x * (1.0 + m as f32)
                                    } else if m == 0 {
                                        x
                                    } else {
                                        y
                                    })
                                })
                                .collect()
                        })
                        .collect();
                    let job = |tensors| MergeJob {
                        name: "w",
                        tensors,
                        base: Some(base.min(inputs - 1)),
                        global: &global,
                        per_model: pm[..inputs].iter().collect(),
                        is_embed: false,
                        seed: 0,
                    };
                    let whole = Slerp
                        .merge(job(data
                            .iter()
                            .map(|d| Tensor::new(shape.clone(), d.clone(), dt))
                            .collect()))
                        .unwrap();
                    let out = Mutex::new(vec![f32::NAN; n]);
                    let emit = |e0: usize, v: &[f32]| -> Result<()> {
                        out.lock().unwrap()[e0..e0 + v.len()].copy_from_slice(v);
                        Ok(())
                    };
                    Slerp
                        .merge_streamed(
                            stream::StreamJob {
                                name: "w",
                                shape: &shape,
                                dtype: dt,
                                n_inputs: inputs,
                                base: Some(base.min(inputs - 1)),
                                global: &global,
                                per_model: pm[..inputs].iter().collect(),
                                seed: 0,
                                block: BLOCK,
                                again: None,
                            },
                            &Src(data),
                            &emit,
                        )
                        .unwrap();
                    let out = out.into_inner().unwrap();
                    assert!(
                        whole
                            .data
                            .iter()
                            .zip(&out)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dt} {shape:?} colinear {colinear} base {base} inputs {inputs}"
                    );
                }
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
