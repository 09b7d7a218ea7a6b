//! Element types of checkpoint tensors and the rounding rules smelt uses to
//! reproduce mergekit's (torch's) arithmetic.
//!
//! Merge kernels hold values as `f32`. A tensor whose working dtype is
//! bfloat16 or float16 keeps only values representable in that dtype: every
//! elementwise operation is followed by [`DType::round`], exactly as torch
//! rounds the result of each op on a half-precision tensor (spec §2).

use half::f16;

/// A tensor element type, as named in safetensors headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Parses a safetensors header dtype (`"BF16"`, `"F32"`, ...).
    pub fn from_safetensors(s: &str) -> Option<DType> {
        Some(match s {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    /// The safetensors header name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Parses a mergekit / torch dtype name (`bfloat16`, `torch.float16`, ...).
    /// mergekit 0.1.5 accepts bfloat16, float16, float32, float64 and int64;
    /// smelt also takes the common aliases `bf16`, `fp16`, `half`, `float`,
    /// `fp32`, `double`. float64 tensors are read and written as such, but
    /// smelt's kernels compute in f32 (relative error ~1e-7, well inside the
    /// conformance tolerance).
    pub fn from_config_name(s: &str) -> Option<DType> {
        let s = s.strip_prefix("torch.").unwrap_or(s);
        Some(match s {
            "bfloat16" | "bf16" => DType::BF16,
            "float16" | "fp16" | "half" => DType::F16,
            "float32" | "fp32" | "float" => DType::F32,
            "float64" | "double" => DType::F64,
            "int64" => DType::I64,
            _ => return None,
        })
    }

    /// The name written to config.json (`"bfloat16"`, ...).
    pub fn config_name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The type torch gives an operation on `self` and `other`
    /// (`torch.promote_types`): the wider float; bfloat16 with float16 is
    /// float32; a float with an integer is the float; integers widen.
    pub fn promote(self, other: DType) -> DType {
        use DType::*;
        if self == other {
            return self;
        }
        let rank = |d: DType| match d {
            Bool => 0,
            U8 => 1,
            I8 => 2,
            I16 => 3,
            I32 => 4,
            I64 => 5,
            F16 | BF16 => 6,
            F32 => 7,
            F64 => 8,
        };
        match (self, other) {
            (F16, BF16) | (BF16, F16) => F32,
            (U8, I8) | (I8, U8) => I16,
            _ if rank(self) >= rank(other) => self,
            _ => other,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// Rounds an f32 to the nearest value representable in this dtype (round to
    /// nearest even), returned as f32. Identity for f32 (and f64, which smelt
    /// computes in f32). Integer dtypes truncate toward zero like torch casts.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::BF16 => bf16_round(x),
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::F32 | DType::F64 => x,
            DType::Bool => {
                if x != 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            _ => x.trunc(),
        }
    }

    /// Decodes little-endian bytes of this dtype into f32 values.
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        let n = bytes.len() / self.size();
        if matches!(self, DType::F32 | DType::BF16) {
            // reused buffers keep their length: no zeroing pass when the
            // size repeats (every element is overwritten below)
            out.truncate(n);
            out.resize(n, 0.0);
        } else {
            out.clear();
            out.reserve(n);
        }
        match self {
            DType::F32 | DType::BF16 => {
                // sized first, then filled by a plain loop: vectorises
                // (AVX2/AVX-512 where the CPU has them, see `simd`)
                if self == DType::F32 {
                    crate::simd::decode_f32(bytes, out);
                } else {
                    crate::simd::decode_bf16(bytes, out);
                }
            }
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            ),
            DType::F64 => out.extend(bytes.chunks_exact(8).map(|c| {
                f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
            })),
            DType::I64 => out.extend(bytes.chunks_exact(8).map(|c| {
                i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
            })),
            DType::I32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32),
            ),
            DType::I16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32),
            ),
            DType::I8 => out.extend(bytes.iter().map(|&b| b as i8 as f32)),
            DType::U8 | DType::Bool => out.extend(bytes.iter().map(|&b| b as f32)),
        }
    }

    /// Encodes f32 values (already representable, see [`DType::round`]) as
    /// little-endian bytes of this dtype, appending to `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            DType::F32 | DType::BF16 => {
                let at = out.len();
                out.resize(at + values.len() * self.size(), 0);
                if self == DType::F32 {
                    crate::simd::encode_f32(values, &mut out[at..]);
                } else {
                    crate::simd::encode_bf16(values, &mut out[at..]);
                }
            }
            DType::F16 => {
                for v in values {
                    out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes())
                }
            }
            DType::F64 => {
                for v in values {
                    out.extend_from_slice(&(*v as f64).to_le_bytes())
                }
            }
            DType::I64 => {
                for v in values {
                    out.extend_from_slice(&(*v as i64).to_le_bytes())
                }
            }
            DType::I32 => {
                for v in values {
                    out.extend_from_slice(&(*v as i32).to_le_bytes())
                }
            }
            DType::I16 => {
                for v in values {
                    out.extend_from_slice(&(*v as i16).to_le_bytes())
                }
            }
            DType::I8 => out.extend(values.iter().map(|v| *v as i8 as u8)),
            DType::U8 => out.extend(values.iter().map(|v| *v as u8)),
            DType::Bool => out.extend(values.iter().map(|v| (*v != 0.0) as u8)),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.config_name())
    }
}

/// Round-to-nearest-even from f32 to bfloat16 precision (NaN stays NaN).
#[inline(always)]
pub fn bf16_round(x: f32) -> f32 {
    // branch-free (a select), so loops over it vectorise
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    let quiet_nan = (b | 0x0040_0000) & 0xFFFF_0000;
    f32::from_bits(if x.is_nan() { quiet_nan } else { rounded })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_follows_torch() {
        use DType::*;
        // torch.promote_types
        assert_eq!(BF16.promote(F16), F32);
        assert_eq!(F16.promote(BF16), F32);
        assert_eq!(BF16.promote(F32), F32);
        assert_eq!(F32.promote(F16), F32);
        assert_eq!(F32.promote(F64), F64);
        assert_eq!(BF16.promote(BF16), BF16);
        assert_eq!(I64.promote(BF16), BF16);
        assert_eq!(U8.promote(I8), I16);
        assert_eq!(I32.promote(I64), I64);
    }

    #[test]
    fn bf16_rounding_matches_half() {
        for x in [
            0.6f32,
            0.4,
            1.0 / 3.0,
            -7.123,
            1e-30,
            3.0e38,
            65504.0,
            0.0,
            -0.0,
        ] {
            assert_eq!(bf16_round(x), half::bf16::from_f32(x).to_f32(), "{x}");
        }
        // mergekit's documented example: bf16(0.6) = 0.6015625, bf16(0.4) = 0.400390625
        assert_eq!(bf16_round(0.6), 0.6015625);
        assert_eq!(bf16_round(0.4), 205.0 / 512.0);
    }

    #[test]
    fn encode_decode_roundtrip() {
        let v = vec![1.5f32, -2.25, 0.0, 100.0];
        for dt in [
            DType::F32,
            DType::BF16,
            DType::F16,
            DType::F64,
            DType::I64,
            DType::I8,
        ] {
            let mut bytes = Vec::new();
            dt.encode(&v, &mut bytes);
            assert_eq!(bytes.len(), v.len() * dt.size());
            let mut back = Vec::new();
            dt.decode(&bytes, &mut back);
            let expect: Vec<f32> = v.iter().map(|x| dt.round(*x)).collect();
            assert_eq!(back, expect, "{dt}");
        }
    }

    #[test]
    fn decode_par_matches_decode_across_chunks() {
        let n = 3 * (1 << 16) + 5;
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let mut bytes = Vec::new();
            dt.encode(&v, &mut bytes);
            let mut one = Vec::new();
            dt.decode(&bytes, &mut one);
            let par = decode_par(dt, &bytes);
            assert_eq!(par.len(), n, "{dt}");
            assert!(
                par.iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dt}"
            );
        }
    }
}

/// Decodes little-endian bytes into f32 values in parallel (64K-value
/// chunks through the vectorised kernels for bf16 and f32).
pub fn decode_par(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    match dtype {
        DType::BF16 | DType::F32 => {
            let size = dtype.size();
            let mut out = vec![0f32; bytes.len() / size];
            out.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(CHUNK * size))
                .for_each(|(o, b)| match dtype {
                    DType::BF16 => crate::simd::decode_bf16(b, o),
                    _ => crate::simd::decode_f32(b, o),
                });
            out
        }
        _ => {
            let mut out = Vec::new();
            dtype.decode(bytes, &mut out);
            out
        }
    }
}

/// Encodes f32 values into little-endian bytes of `dtype` in parallel.
pub fn encode_par(dtype: DType, values: &[f32]) -> Vec<u8> {
    use rayon::prelude::*;
    const B: usize = 1 << 15;
    let s = dtype.size();
    let mut out = vec![0u8; values.len() * s];
    out.par_chunks_mut(B * s).enumerate().for_each(|(b, o)| {
        let src = &values[b * B..b * B + o.len() / s];
        match dtype {
            DType::BF16 => {
                for (c, v) in o.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&((bf16_round(*v).to_bits() >> 16) as u16).to_le_bytes());
                }
            }
            DType::F32 => {
                for (c, v) in o.chunks_exact_mut(4).zip(src) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                let mut tmp = Vec::with_capacity(o.len());
                dtype.encode(src, &mut tmp);
                o.copy_from_slice(&tmp);
            }
        }
    });
    out
}

/// Rounding to a working dtype, as a type: kernels generic over it are
/// compiled once per dtype, so the per-op rounding inlines and vectorises.
pub trait Rounding: Copy + Send + Sync + 'static {
    /// Whether this is [`Bf16Rounding`] (kernels written for bfloat16).
    const IS_BF16: bool = false;
    fn r(self, x: f32) -> f32;
}

#[derive(Clone, Copy)]
pub struct Bf16Rounding;
#[derive(Clone, Copy)]
pub struct F16Rounding;
#[derive(Clone, Copy)]
pub struct ExactRounding;

impl Rounding for Bf16Rounding {
    const IS_BF16: bool = true;
    #[inline(always)]
    fn r(self, x: f32) -> f32 {
        bf16_round(x)
    }
}
impl Rounding for F16Rounding {
    #[inline(always)]
    fn r(self, x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
}
impl Rounding for ExactRounding {
    #[inline(always)]
    fn r(self, x: f32) -> f32 {
        x
    }
}

/// Runs `$body` with `$r` bound to the [`Rounding`] of dtype `$dt`.
#[macro_export]
macro_rules! with_rounding {
    ($dt:expr, |$r:ident| $body:expr) => {
        match $dt {
            $crate::dtype::DType::BF16 => {
                #[allow(unused_imports)]
                use $crate::dtype::Rounding as _;
                let $r = $crate::dtype::Bf16Rounding;
                $body
            }
            $crate::dtype::DType::F16 => {
                #[allow(unused_imports)]
                use $crate::dtype::Rounding as _;
                let $r = $crate::dtype::F16Rounding;
                $body
            }
            _ => {
                #[allow(unused_imports)]
                use $crate::dtype::Rounding as _;
                let $r = $crate::dtype::ExactRounding;
                $body
            }
        }
    };
}
