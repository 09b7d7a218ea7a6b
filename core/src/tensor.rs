//! An in-memory tensor as merge kernels see it: a shape, values held as f32,
//! and the working dtype whose precision the values carry.

use crate::dtype::DType;

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// The working dtype: every value is representable in it.
    pub dtype: DType,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>, dtype: DType) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data, dtype }
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape.to_vec(), vec![0.0; n], dtype)
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Casts to another dtype, rounding every value (torch `.to(dtype)`).
    pub fn cast(mut self, dtype: DType) -> Tensor {
        cast_slice(&mut self.data, self.dtype, dtype);
        self.dtype = dtype;
        self
    }

    /// Length of the last axis (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// The top-left `rows × cols` sub-matrix of a 2-D tensor.
    pub fn top_left(&self, rows: usize, cols: usize) -> Tensor {
        let c0 = self.shape[1];
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            data.extend_from_slice(&self.data[r * c0..r * c0 + cols]);
        }
        Tensor::new(vec![rows, cols], data, self.dtype)
    }

    pub fn shape_str(&self) -> String {
        format!("{:?}", self.shape)
    }
}

/// Casts values held in `from`'s precision to `to`, in place, rounding
/// every value (what [`Tensor::cast`] does to a tensor's data).
pub fn cast_slice(data: &mut [f32], from: DType, to: DType) {
    if to == from || !dtype_narrows(from, to) {
        return;
    }
    use rayon::prelude::*;
    let par = data.len() > 1 << 16;
    crate::with_rounding!(to, |r| if par {
        data.par_chunks_mut(1 << 15).for_each(|c| {
            for v in c {
                *v = r.r(*v);
            }
        })
    } else {
        for v in data.iter_mut() {
            *v = r.r(*v);
        }
    });
    if !to.is_float() {
        for v in data.iter_mut() {
            *v = to.round(*v);
        }
    }
}

/// Whether casting `from` → `to` can change values (so rounding is needed).
fn dtype_narrows(from: DType, to: DType) -> bool {
    !matches!(
        (from, to),
        (DType::BF16, DType::F32)
            | (DType::F16, DType::F32)
            | (DType::BF16, DType::F64)
            | (DType::F16, DType::F64)
            | (DType::F32, DType::F64)
    )
}
