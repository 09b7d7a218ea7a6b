//! Hot element loops compiled three times — baseline x86-64, AVX2+FMA and
//! AVX-512 — and picked at run time, so the same binary runs everywhere and
//! uses wide vectors where the CPU has them. Only plain IEEE operations are
//! used (no fused multiply-add contraction, no reassociation), so every
//! variant computes the same bits.

/// Defines `pub fn $name($args)` dispatching to the widest variant of the
/// `#[inline(always)]` body `$body` that this CPU supports.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($a:ident: $t:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) {
            #[inline(always)]
            fn body($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                fn v4($($a: $t),*) { body($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($a: $t),*) { body($($a),*) }
                match level() {
                    // SAFETY: `level` checked that the CPU has these features.
                    Level::V4 => return unsafe { v4($($a),*) },
                    Level::V3 => return unsafe { v3($($a),*) },
                    Level::Base => {}
                }
            }
            body($($a),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Base,
    V3,
    V4,
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn level() -> Level {
    use std::sync::OnceLock;
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(|| {
        if std::env::var_os("SMELT_NO_SIMD").is_some() {
            Level::Base
        } else if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            Level::V4
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Level::V3
        } else {
            Level::Base
        }
    })
}

multiversion! {
    /// Little-endian bf16 bytes → f32 (`out.len()` elements).
    pub fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
        }
    }
}

multiversion! {
    /// Little-endian f32 bytes → f32 (`out.len()` elements).
    pub fn decode_f32(bytes: &[u8], out: &mut [f32]) {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
}

multiversion! {
    /// f32 → little-endian bf16 bytes, rounded to nearest even (NaN stays NaN).
    pub fn encode_bf16(values: &[f32], out: &mut [u8]) {
        for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
            let b = (crate::dtype::bf16_round(*v).to_bits() >> 16) as u16;
            c.copy_from_slice(&b.to_le_bytes());
        }
    }
}

multiversion! {
    /// f32 → little-endian f32 bytes.
    pub fn encode_f32(values: &[f32], out: &mut [u8]) {
        for (v, c) in values.iter().zip(out.chunks_exact_mut(4)) {
            c.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// `x[i] = r(x[i] - b[i])`: a task vector block, rounded to the working
/// dtype.
pub fn sub_rounded<R: crate::dtype::Rounding>(r: R, x: &mut [f32], b: &[f32]) {
    #[inline(always)]
    fn body<R: crate::dtype::Rounding>(r: R, x: &mut [f32], b: &[f32]) {
        for (xi, bi) in x.iter_mut().zip(b) {
            *xi = r.r(*xi - bi);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
        fn v4<R: crate::dtype::Rounding>(r: R, x: &mut [f32], b: &[f32]) {
            body(r, x, b)
        }
        #[target_feature(enable = "avx2,fma")]
        fn v3<R: crate::dtype::Rounding>(r: R, x: &mut [f32], b: &[f32]) {
            body(r, x, b)
        }
        match level() {
            // SAFETY: `level` checked that the CPU has these features.
            Level::V4 => return unsafe { v4(r, x, b) },
            Level::V3 => return unsafe { v3(r, x, b) },
            Level::Base => {}
        }
    }
    body(r, x, b)
}

#[cfg(test)]
mod tests {
    /// Every variant gives the same bytes as the scalar definition.
    #[test]
    fn codecs_match_scalar_definitions() {
        let vals: Vec<f32> = (0..10_000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .chain([
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                1.0 / 3.0,
            ])
            .collect();
        let mut enc = vec![0u8; vals.len() * 2];
        super::encode_bf16(&vals, &mut enc);
        for (v, c) in vals.iter().zip(enc.chunks_exact(2)) {
            let want = half::bf16::from_f32(*v);
            let got = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]]));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{v}"
            );
        }
        let mut dec = vec![0f32; vals.len()];
        super::decode_bf16(&enc, &mut dec);
        for (d, c) in dec.iter().zip(enc.chunks_exact(2)) {
            assert_eq!(d.to_bits(), (u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
        }
        let mut enc4 = vec![0u8; vals.len() * 4];
        super::encode_f32(&vals, &mut enc4);
        let mut dec4 = vec![0f32; vals.len()];
        super::decode_f32(&enc4, &mut dec4);
        assert!(
            vals.iter()
                .zip(&dec4)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}
