//! Hot element loops compiled three times — baseline x86-64, AVX2+FMA and
//! AVX-512 — and picked at run time, so the same binary runs everywhere and
//! uses wide vectors where the CPU has them. Only plain IEEE operations are
//! used (no fused multiply-add contraction, no reassociation), so every
//! variant computes the same bits.

/// Defines `pub fn $name($args)` dispatching to the widest variant of the
/// `#[inline(always)]` body `$body` that this CPU supports.
macro_rules! multiversion {
    // generic: `fn name<T: Bound, ..>(..)`
    ($(#[$m:meta])* $vis:vis fn $name:ident<$($g:ident: $gb:path),+>($($a:ident: $t:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name<$($g: $gb),+>($($a: $t),*) $(-> $ret)? {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn body<$($g: $gb),+>($($a: $t),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
                fn v4<$($g: $gb),+>($($a: $t),*) $(-> $ret)? { body($($a),*) }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn v3<$($g: $gb),+>($($a: $t),*) $(-> $ret)? { body($($a),*) }
                match $crate::simd::level() {
                    // SAFETY: `level` checked that the CPU has these features.
                    $crate::simd::Level::V4 => return unsafe { v4($($a),*) },
                    $crate::simd::Level::V3 => return unsafe { v3($($a),*) },
                    $crate::simd::Level::Base => {}
                }
            }
            body($($a),*)
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
                fn v4($($a: $t),*) $(-> $ret)? { body($($a),*) }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($a: $t),*) $(-> $ret)? { body($($a),*) }
                match $crate::simd::level() {
                    // SAFETY: `level` checked that the CPU has these features.
                    $crate::simd::Level::V4 => return unsafe { v4($($a),*) },
                    $crate::simd::Level::V3 => return unsafe { v3($($a),*) },
                    $crate::simd::Level::Base => {}
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use multiversion;

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
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("popcnt")
        {
            Level::V4
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Level::V3
        } else {
            Level::Base
        }
    })
}

/// Whether the AVX-512 BF16 kernels may run (AVX-512 level, and the CPU
/// converts f32 to bfloat16 in hardware).
#[cfg(target_arch = "x86_64")]
pub(crate) fn bf16_native() -> bool {
    use std::sync::OnceLock;
    static B: OnceLock<bool> = OnceLock::new();
    *B.get_or_init(|| level() == Level::V4 && is_x86_feature_detected!("avx512bf16"))
}

/// The two-model combination of the task-arithmetic family in bfloat16
/// (`generalized_task_arithmetic::fused_loop` for two models, the same
/// operations in the same order, so the same bits): `sum` = sign consensus,
/// `nz` = normalise (by the agreeing weights, or by `plain_div` without
/// consensus), `lam` = lambda. Combines whole groups of 16 elements from the
/// start of `o` and returns how many elements it did (none where the CPU
/// lacks AVX-512 BF16): the caller does the rest.
#[allow(clippy::too_many_arguments)]
pub fn combine2_bf16(
    base: &[f32],
    m0: &[f32],
    m1: &[f32],
    w: [f32; 2],
    sum: bool,
    nz: bool,
    plain_div: f32,
    lam: Option<f32>,
    o: &mut [f32],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if bf16_native() && base.len() >= o.len() && m0.len() >= o.len() && m1.len() >= o.len() {
        let whole = o.len() / 16 * 16;
        // SAFETY: `bf16_native` checked AVX-512 F/BW/DQ and BF16; the
        // slices hold `whole` elements each.
        unsafe { combine2_bf16_v4(base, m0, m1, w, sum, nz, plain_div, lam, &mut o[..whole]) };
        return whole;
    }
    let _ = (base, m0, m1, w, sum, nz, plain_div, lam, o);
    0
}

/// [`crate::dtype::bf16_round`] of 16 lanes: the hardware conversion, which
/// rounds to nearest even and quiets NaN as `bf16_round` does, but flushes
/// subnormal inputs to zero, so lanes holding one are rounded in bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
#[inline]
fn r16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let h: __m256i = unsafe { std::mem::transmute(_mm512_cvtneps_pbh(x)) };
    let y = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
    let sub = _mm512_fpclass_ps_mask::<0x20>(x);
    if sub == 0 {
        return y;
    }
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
    let r = _mm512_and_si512(r, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
    _mm512_mask_mov_ps(y, sub, _mm512_castsi512_ps(r))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
#[allow(clippy::too_many_arguments)]
fn combine2_bf16_v4(
    base: &[f32],
    m0: &[f32],
    m1: &[f32],
    w: [f32; 2],
    sum: bool,
    nz: bool,
    plain_div: f32,
    lam: Option<f32>,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    // whole groups of 16 (the caller's slice)
    let whole = o.len() / 16 * 16;
    let (w0, w1) = (_mm512_set1_ps(w[0]), _mm512_set1_ps(w[1]));
    let zero = _mm512_setzero_ps();
    let one = _mm512_set1_ps(1.0);
    let pd = _mm512_set1_ps(plain_div);
    let lv = _mm512_set1_ps(lam.unwrap_or(1.0));
    // the divisor of each agreement pattern, as the generic loop makes it
    // (`bf16(0 + w0·[a0] + w1·[a1])`, 1 for 0)
    let fix = |d: f32| if d == 0.0 { 1.0 } else { d };
    let rd = crate::dtype::bf16_round;
    let c0 = _mm512_set1_ps(fix(rd(0.0 + w[0])));
    let c1 = _mm512_set1_ps(fix(rd(0.0 + w[1])));
    let c01 = _mm512_set1_ps(fix(rd((0.0 + w[0]) + w[1])));
    let mut i = 0;
    while i < whole {
        // SAFETY: `i + 16 <= o.len()` and every slice holds that many.
        unsafe {
            let x0 = _mm512_loadu_ps(m0.as_ptr().add(i));
            let x1 = _mm512_loadu_ps(m1.as_ptr().add(i));
            let wd0 = r16(_mm512_mul_ps(x0, w0));
            let wd1 = r16(_mm512_mul_ps(x1, w1));
            let mut v = if sum {
                let s = _mm512_add_ps(_mm512_add_ps(zero, wd0), wd1);
                // majority sign (zero counts as positive); `s` is a sum of
                // two bfloat16 values, so it rounds to zero only when it is
                // zero and its rounding keeps its sign
                let pos = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(s, zero);
                let maj = _mm512_mask_mov_ps(_mm512_set1_ps(-1.0), pos, one);
                let a0 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_mul_ps(wd0, maj), zero);
                let a1 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_mul_ps(wd1, maj), zero);
                // the agreeing sum: both → bf16(s); one → its (bfloat16)
                // term; none → 0
                let both = a0 & a1;
                let v = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(a0, wd0), a1 & !a0, wd1);
                let v = _mm512_mask_mov_ps(v, both, r16(s));
                if nz {
                    let d = _mm512_mask_mov_ps(_mm512_mask_mov_ps(one, a0, c0), a1 & !a0, c1);
                    let d = _mm512_mask_mov_ps(d, both, c01);
                    r16(_mm512_div_ps(v, d))
                } else {
                    v
                }
            } else {
                let v = r16(_mm512_add_ps(_mm512_add_ps(zero, wd0), wd1));
                if nz { r16(_mm512_div_ps(v, pd)) } else { v }
            };
            if lam.is_some() {
                v = r16(_mm512_mul_ps(v, lv));
            }
            let b = _mm512_loadu_ps(base.as_ptr().add(i));
            _mm512_storeu_ps(o.as_mut_ptr().add(i), r16(_mm512_add_ps(b, v)));
        }
        i += 16;
    }
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
    /// [`encode_bf16`] into bytes not yet set (every one is written).
    pub fn encode_bf16_uninit(values: &[f32], out: &mut [std::mem::MaybeUninit<u8>]) {
        for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
            let b = ((crate::dtype::bf16_round(*v).to_bits() >> 16) as u16).to_le_bytes();
            c[0].write(b[0]);
            c[1].write(b[1]);
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

multiversion! {
    /// `out[i] = bf16(x[i] - b[i])` for little-endian bf16 bytes `x`: a
    /// bfloat16 task vector block straight from the file's bytes (the same
    /// bits as [`decode_bf16`] then [`sub_rounded`], without the decoded
    /// buffer in between).
    pub fn delta_bf16(bytes: &[u8], b: &[f32], out: &mut [f32]) {
        for ((o, c), bi) in out.iter_mut().zip(bytes.chunks_exact(2)).zip(b) {
            let x = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            *o = crate::dtype::bf16_round(x - bi);
        }
    }
}

multiversion! {
    /// `x[i] = r(x[i] - b[i])`: a task vector block, rounded to the working
    /// dtype.
    pub fn sub_rounded<R: crate::dtype::Rounding>(r: R, x: &mut [f32], b: &[f32]) {
        for (xi, bi) in x.iter_mut().zip(b) {
            *xi = r.r(*xi - bi);
        }
    }
}

/// The selection key of `x` (see [`crate::methods::sparsify::abs_key`]),
/// complemented when `flip` is `u32::MAX` (ranking from the small end).
#[inline(always)]
pub fn key(x: f32, flip: u32) -> u32 {
    (x.to_bits() & 0x7FFF_FFFF) ^ flip
}

multiversion! {
    /// Adds the high 16 bits of every key to `h` (65 536 bins); with
    /// `lo = Some`, also ORs / ANDs the keys' low halves into `lo.0` / `lo.1`.
    pub fn hist_hi(d: &[f32], flip: u32, h: &mut [u32], lo: Option<&mut (u32, u32)>) {
        let h = &mut h[..1 << 16];
        match lo {
            None => {
                for x in d {
                    h[(key(*x, flip) >> 16) as usize] += 1;
                }
            }
            Some(lo) => {
                let (mut or, mut and) = *lo;
                for x in d {
                    let k = key(*x, flip);
                    h[(k >> 16) as usize] += 1;
                    or |= k & 0xFFFF;
                    and &= k & 0xFFFF;
                }
                *lo = (or, and);
            }
        }
    }
}

/// Whether [`hist_window`] compacts with vector instructions here (else it
/// is no faster than [`hist_hi`]).
pub fn compacts() -> bool {
    #[cfg(target_arch = "x86_64")]
    return level() == Level::V4;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Like [`hist_hi`] (no low halves) for keys whose high half lies in
/// `lo..=hi` only; returns how many keys have a high half above `hi` (the
/// rest, below `lo`, are neither counted nor binned). With AVX-512 the keys
/// in the window are compacted 16 at a time and only they touch the
/// histogram: a window around a top-k threshold holds a few percent of a
/// task vector, so this runs several times faster than binning every key.
pub fn hist_window(d: &[f32], flip: u32, lo: u32, hi: u32, h: &mut [u32]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::V4 && lo <= hi {
        // SAFETY: `level` checked that the CPU has AVX-512F and POPCNT.
        return unsafe { hist_window_v4(d, flip, lo, hi, h) };
    }
    hist_window_generic(d, flip, lo, hi, h)
}

fn hist_window_generic(d: &[f32], flip: u32, lo: u32, hi: u32, h: &mut [u32]) -> u64 {
    let h = &mut h[..1 << 16];
    let mut above = 0u64;
    for x in d {
        let k = key(*x, flip) >> 16;
        if k > hi {
            above += 1;
        } else if k >= lo {
            h[k as usize] += 1;
        }
    }
    above
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
fn hist_window_v4(d: &[f32], flip: u32, lo: u32, hi: u32, h: &mut [u32]) -> u64 {
    use std::arch::x86_64::*;
    const PIECE: usize = 1024;
    let h = &mut h[..1 << 16];
    let mut buf = [0u32; PIECE + 16];
    let absmask = _mm512_set1_epi32(0x7FFF_FFFF);
    let vflip = _mm512_set1_epi32(flip as i32);
    let vlo = _mm512_set1_epi32(lo as i32);
    let span = _mm512_set1_epi32(hi.wrapping_sub(lo) as i32);
    let vhi = _mm512_set1_epi32(hi as i32);
    let one = _mm512_set1_epi32(1);
    let mut above = 0u64;
    let whole = d.len() / 16 * 16;
    for piece in d[..whole].chunks(PIECE) {
        let mut n = 0usize;
        let mut ab = _mm512_setzero_si512();
        for c in piece.chunks_exact(16) {
            // SAFETY: `c` holds 16 f32; `buf` has room for 16 more past
            // `n` (< PIECE + 1 here).
            unsafe {
                let v = _mm512_loadu_si512(c.as_ptr().cast());
                let k =
                    _mm512_srli_epi32(_mm512_xor_si512(_mm512_and_si512(v, absmask), vflip), 16);
                // lo <= k <= hi  ⇔  k - lo <= hi - lo (unsigned)
                let inw = _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, vlo), span);
                let up = _mm512_cmpgt_epu32_mask(k, vhi);
                ab = _mm512_mask_add_epi32(ab, up, ab, one);
                _mm512_storeu_si512(
                    buf.as_mut_ptr().add(n).cast(),
                    _mm512_maskz_compress_epi32(inw, k),
                );
                n += inw.count_ones() as usize;
            }
        }
        for k in &buf[..n] {
            h[*k as usize] += 1;
        }
        above += _mm512_reduce_add_epi32(ab) as u32 as u64;
    }
    above + hist_window_generic(&d[whole..], flip, lo, hi, h)
}

/// `out[j] = lut[idx[j]]` for every `j` of the shorter of `idx` and `out`;
/// an index past the end of `lut` reads its last entry. `lut` must not be
/// empty.
pub fn gather_f32(lut: &[f32], idx: &[u32], out: &mut [f32]) {
    assert!(!lut.is_empty(), "gather from an empty table");
    #[cfg(target_arch = "x86_64")]
    if level() == Level::V4 && lut.len() <= i32::MAX as usize {
        // SAFETY: `level` checked that the CPU has AVX-512F.
        return unsafe { gather_f32_v4(lut, idx, out) };
    }
    gather_f32_generic(lut, idx, out)
}

fn gather_f32_generic(lut: &[f32], idx: &[u32], out: &mut [f32]) {
    let last = lut.len() - 1;
    for (o, i) in out.iter_mut().zip(idx) {
        *o = lut[(*i as usize).min(last)];
    }
}

/// [`gather_f32`] with AVX-512 gathers (indices clamped to the table first).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gather_f32_v4(lut: &[f32], idx: &[u32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = idx.len().min(out.len());
    let whole = n / 16 * 16;
    let last = _mm512_set1_epi32((lut.len() - 1) as i32);
    for (o, i) in out[..whole]
        .chunks_exact_mut(16)
        .zip(idx[..whole].chunks_exact(16))
    {
        // SAFETY: `i` and `o` hold 16 lanes each; every lane's index is
        // clamped to `lut.len() - 1`, so the gather reads inside `lut`.
        unsafe {
            let k = _mm512_min_epu32(_mm512_loadu_si512(i.as_ptr().cast()), last);
            let v = _mm512_i32gather_ps::<4>(k, lut.as_ptr());
            _mm512_storeu_ps(o.as_mut_ptr(), v);
        }
    }
    gather_f32_generic(lut, &idx[whole..n], &mut out[whole..n]);
}

/// DELLA's probability of each occupied counting-sort bin: for the bins
/// `nz` (ascending) with counts `counts[b]` and ranks from `acc` on,
/// `lut[b] = (cum[hi] − cum[lo]) · inv[c]` in f64, rounded to f32, where
/// `c = counts[b]`, `lo` the bin's first rank and `hi = lo + c` (a bin's
/// ranks end where the next one's start: one sum is read per bin). Indices
/// are clamped to the tables (the counts must add up to at most
/// `cum.len() − 1 − acc` for the result to mean anything).
pub fn tie_means(
    nz: &[u32],
    counts: &[u32],
    cum: &[f64],
    inv: &[f64],
    acc: usize,
    lut: &mut [f32],
) {
    if nz.is_empty() || counts.is_empty() || cum.is_empty() || inv.is_empty() || lut.is_empty() {
        return;
    }
    tie_means_scalar(nz, counts, cum, inv, acc, lut);
}

/// [`tie_means`]' loop, out of line so that it keeps everything in
/// registers. Scalar: AVX-512 gathers and scatters of eight bins at a time
/// measured slower on Cascade Lake.
#[inline(never)]
fn tie_means_scalar(
    nz: &[u32],
    counts: &[u32],
    cum: &[f64],
    inv: &[f64],
    mut acc: usize,
    lut: &mut [f32],
) {
    let bmax = counts.len().min(lut.len()) - 1;
    let (hmax, cmax) = (cum.len() - 1, inv.len() - 1);
    acc = acc.min(hmax);
    let mut prev = cum[acc];
    for b in nz {
        let b = (*b as usize).min(bmax);
        let c = (counts[b] as usize).min(cmax);
        acc = (acc + c).min(hmax);
        let next = cum[acc];
        lut[b] = ((next - prev) * inv[c]) as f32;
        prev = next;
    }
}

/// Writes the indices `i >= from` where `c[i] != 0`, ascending, to
/// `out[..n]` and returns `n`. `out` only grows (its other entries are
/// scratch).
pub fn nonzero_indices(c: &[u32], from: usize, out: &mut Vec<u32>) -> usize {
    let from = from.min(c.len());
    // room for a whole vector past the last index written
    let need = c.len() - from + 16;
    if out.len() < need {
        out.resize(need, 0);
    }
    #[cfg(target_arch = "x86_64")]
    if level() == Level::V4 && c.len() <= i32::MAX as usize {
        // SAFETY: `level` checked that the CPU has AVX-512F and POPCNT.
        return unsafe { nonzero_indices_v4(c, from, out) };
    }
    nonzero_indices_generic(c, from, 0, out)
}

/// Writes the indices from `from` with a non-zero count to `out[n..]`;
/// returns the new `n`. Branch-free: every index is written, `n` moves on
/// past the non-zero ones.
fn nonzero_indices_generic(c: &[u32], from: usize, mut n: usize, out: &mut [u32]) -> usize {
    for (i, x) in c.iter().enumerate().skip(from) {
        out[n] = i as u32;
        n += (*x != 0) as usize;
    }
    n
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
fn nonzero_indices_v4(c: &[u32], from: usize, out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let len = c.len() - from;
    let whole = len / 16 * 16;
    let mut iv = _mm512_add_epi32(
        _mm512_set1_epi32(from as i32),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    );
    let sixteen = _mm512_set1_epi32(16);
    let mut n = 0usize;
    for ch in c[from..from + whole].chunks_exact(16) {
        // SAFETY: `ch` holds 16 counts; `out` has `len + 16` slots and
        // `n` ≤ the number of indices seen so far, so 16 lanes fit.
        unsafe {
            let v = _mm512_loadu_si512(ch.as_ptr().cast());
            let nz = _mm512_test_epi32_mask(v, v);
            // compress in a register, then a plain store: the memory form
            // of vpcompressd is microcoded (tens of cycles) on AMD Zen 4
            _mm512_storeu_si512(
                out.as_mut_ptr().add(n).cast(),
                _mm512_maskz_compress_epi32(nz, iv),
            );
            n += nz.count_ones() as usize;
        }
        iv = _mm512_add_epi32(iv, sixteen);
    }
    nonzero_indices_generic(c, from + whole, n, out)
}

multiversion! {
    /// Adds the low 16 bits of the keys whose high half is `hi` to `h`.
    pub fn hist_lo(d: &[f32], flip: u32, hi: u32, h: &mut [u32]) {
        let h = &mut h[..1 << 16];
        for x in d {
            let k = key(*x, flip);
            if k >> 16 == hi {
                h[(k & 0xFFFF) as usize] += 1;
            }
        }
    }
}

multiversion! {
    /// How many keys equal `thr`.
    pub fn count_eq(d: &[f32], flip: u32, thr: u32) -> u64 {
        let mut total = 0u64;
        for ch in d.chunks(1 << 20) {
            let mut c = 0u32;
            for x in ch {
                c += (key(*x, flip) == thr) as u32;
            }
            total += c as u64;
        }
        total
    }
}

multiversion! {
    /// Zeroes (+0.0) every element whose key is below `thr`, or equal to it
    /// unless `keep_eq`.
    pub fn keep_above(d: &mut [f32], flip: u32, thr: u32, keep_eq: bool) {
        if keep_eq {
            for x in d.iter_mut() {
                *x = if key(*x, flip) >= thr { *x } else { 0.0 };
            }
        } else {
            for x in d.iter_mut() {
                *x = if key(*x, flip) > thr { *x } else { 0.0 };
            }
        }
    }
}

multiversion! {
    /// Zeroes (+0.0) every element whose flag is 0.
    pub fn keep_flagged(d: &mut [f32], f: &[u8]) {
        for (x, k) in d.iter_mut().zip(f) {
            *x = if *k != 0 { *x } else { 0.0 };
        }
    }
}

multiversion! {
    /// DARE's mask: keeps element `i` (flat index `e0 + i`) when
    /// `s.bernoulli(e0 + i, p)`, else +0.0 — [`crate::rng::Stream::bernoulli`]
    /// on 32-bit lanes.
    pub fn keep_random(d: &mut [f32], s: crate::rng::Stream, e0: u64, p: f32) {
        crate::rng::draw_runs(s, e0, d.len(), |off, run, k32, mut m| {
            for x in d[off..off + run].iter_mut() {
                *x = if crate::rng::draw_at(k32, m) < p { *x } else { 0.0 };
                m = m.wrapping_add(crate::rng::Stream::STEP32);
            }
        });
    }
}

multiversion! {
    /// Keep flags of DARE's mask (see [`keep_random`]).
    pub fn random_flags(f: &mut [u8], s: crate::rng::Stream, e0: u64, p: f32) {
        crate::rng::draw_runs(s, e0, f.len(), |off, run, k32, mut m| {
            for x in f[off..off + run].iter_mut() {
                *x = (crate::rng::draw_at(k32, m) < p) as u8;
                m = m.wrapping_add(crate::rng::Stream::STEP32);
            }
        });
    }
}

multiversion! {
    /// DELLA's flags of one rank row: `f[j] = s.bernoulli(e0 + j, p[j])`.
    pub fn della_flags(f: &mut [u8], p: &[f32], s: crate::rng::Stream, e0: u64) {
        let n = f.len().min(p.len());
        crate::rng::draw_runs(s, e0, n, |off, run, k32, mut m| {
            for (x, p) in f[off..off + run].iter_mut().zip(&p[off..off + run]) {
                *x = (crate::rng::draw_at(k32, m) < *p) as u8;
                m = m.wrapping_add(crate::rng::Stream::STEP32);
            }
        });
    }
}

/// DELLA's flags of one rank row from a probability per bin:
/// `f[j] = s.bernoulli(e0 + j, lut[bins[j]])` (a bin past the end of `lut`
/// reads its last entry; `lut` must not be empty).
pub fn della_flags_lut(f: &mut [u8], bins: &[u32], lut: &[f32], s: crate::rng::Stream, e0: u64) {
    assert!(!lut.is_empty(), "probabilities of no bins");
    let n = f.len().min(bins.len());
    crate::rng::draw_runs(s, e0, n, |off, run, k32, m| {
        let (f, bins) = (&mut f[off..off + run], &bins[off..off + run]);
        #[cfg(target_arch = "x86_64")]
        if level() == Level::V4 && lut.len() <= i32::MAX as usize {
            // SAFETY: `level` checked that the CPU has AVX-512F/BW/DQ/VL.
            return unsafe { della_flags_lut_v4(f, bins, lut, k32, m) };
        }
        della_flags_lut_generic(f, bins, lut, k32, m)
    });
}

/// [`della_flags_lut`] over one run of draws (see [`crate::rng::draw_runs`]).
fn della_flags_lut_generic(f: &mut [u8], bins: &[u32], lut: &[f32], k32: u32, mut m: u32) {
    let last = lut.len() - 1;
    for (x, b) in f.iter_mut().zip(bins) {
        *x = (crate::rng::draw_at(k32, m) < lut[(*b as usize).min(last)]) as u8;
        m = m.wrapping_add(crate::rng::Stream::STEP32);
    }
}

/// [`della_flags_lut_generic`] with AVX-512: 16 draws (the 32-bit hash of
/// [`crate::rng::draw_at`] on 16 lanes) against 16 gathered probabilities.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
fn della_flags_lut_v4(f: &mut [u8], bins: &[u32], lut: &[f32], k32: u32, m0: u32) {
    use crate::rng::Stream;
    use std::arch::x86_64::*;
    let n = f.len().min(bins.len());
    let whole = n / 16 * 16;
    let key = _mm512_set1_epi32(k32 as i32);
    let c1 = _mm512_set1_epi32(0x21f0_aaadu32 as i32);
    let c2 = _mm512_set1_epi32(0x735a_2d97u32 as i32);
    let scale = _mm512_set1_ps(1.0 / 16_777_216.0);
    let last = _mm512_set1_epi32((lut.len() - 1) as i32);
    let one = _mm_set1_epi8(1);
    let lane = |k: u32| m0.wrapping_add(k.wrapping_mul(Stream::STEP32)) as i32;
    let mut m = _mm512_setr_epi32(
        lane(0),
        lane(1),
        lane(2),
        lane(3),
        lane(4),
        lane(5),
        lane(6),
        lane(7),
        lane(8),
        lane(9),
        lane(10),
        lane(11),
        lane(12),
        lane(13),
        lane(14),
        lane(15),
    );
    let step16 = _mm512_set1_epi32(Stream::STEP32.wrapping_mul(16) as i32);
    for (x, b) in f[..whole]
        .chunks_exact_mut(16)
        .zip(bins[..whole].chunks_exact(16))
    {
        let mut z = _mm512_xor_si512(key, m);
        z = _mm512_xor_si512(z, _mm512_srli_epi32::<16>(z));
        z = _mm512_mullo_epi32(z, c1);
        z = _mm512_xor_si512(z, _mm512_srli_epi32::<15>(z));
        z = _mm512_mullo_epi32(z, c2);
        z = _mm512_xor_si512(z, _mm512_srli_epi32::<15>(z));
        // 24 bits: exact as f32
        let u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(z)), scale);
        // SAFETY: `b` and `x` hold 16 lanes each; the indices are clamped
        // to `lut.len() - 1`, so the gather reads inside `lut`.
        unsafe {
            let k = _mm512_min_epu32(_mm512_loadu_si512(b.as_ptr().cast()), last);
            let p = _mm512_i32gather_ps::<4>(k, lut.as_ptr());
            let keep = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(u, p);
            _mm_storeu_si128(x.as_mut_ptr().cast(), _mm_maskz_mov_epi8(keep, one));
        }
        m = _mm512_add_epi32(m, step16);
    }
    della_flags_lut_generic(
        &mut f[whole..n],
        &bins[whole..n],
        lut,
        k32,
        m0.wrapping_add((whole as u32).wrapping_mul(Stream::STEP32)),
    );
}

/// Flags (0 / non-zero) into bits, 64 per word, LSB first.
pub fn pack_flags(f: &[u8], bits: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::V4 {
        // SAFETY: `level` checked that the CPU has AVX-512F/BW.
        return unsafe { pack_flags_v4(f, bits) };
    }
    pack_flags_generic(f, bits)
}

fn pack_flags_generic(f: &[u8], bits: &mut [u64]) {
    for (w, c) in bits.iter_mut().zip(f.chunks(64)) {
        let mut m = 0u64;
        for (j, x) in c.iter().enumerate() {
            m |= ((*x != 0) as u64) << j;
        }
        *w = m;
    }
}

/// [`pack_flags`] with AVX-512BW: one byte test per 64 flags (LLVM makes a
/// long shift-and-or chain of the plain loop).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_flags_v4(f: &[u8], bits: &mut [u64]) {
    use std::arch::x86_64::*;
    let whole = (f.len() / 64).min(bits.len());
    for (w, c) in bits[..whole].iter_mut().zip(f.chunks_exact(64)) {
        // SAFETY: `c` holds 64 bytes (chunks_exact).
        let v = unsafe { _mm512_loadu_si512(c.as_ptr().cast()) };
        *w = _mm512_test_epi8_mask(v, v);
    }
    pack_flags_generic(&f[whole * 64..], &mut bits[whole..]);
}

/// Zeroes (+0.0) every element whose bit (see [`pack_flags`]) is clear.
pub fn keep_bits(d: &mut [f32], bits: &[u64]) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::V4 {
        // SAFETY: `level` checked that the CPU has AVX-512F.
        return unsafe { keep_bits_v4(d, bits) };
    }
    keep_bits_generic(d, bits)
}

fn keep_bits_generic(d: &mut [f32], bits: &[u64]) {
    for (c, w) in d.chunks_mut(64).zip(bits) {
        for (j, x) in c.iter_mut().enumerate() {
            *x = if (w >> j) & 1 != 0 { *x } else { 0.0 };
        }
    }
}

/// [`keep_bits`] with AVX-512: a zero-masked move per 16 elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn keep_bits_v4(d: &mut [f32], bits: &[u64]) {
    use std::arch::x86_64::*;
    let whole = (d.len() / 64).min(bits.len());
    let (head, tail) = d.split_at_mut(whole * 64);
    for (c, w) in head.chunks_exact_mut(64).zip(bits) {
        for (q, x) in c.chunks_exact_mut(16).enumerate() {
            let k = (w >> (16 * q)) as u16;
            // SAFETY: `x` holds 16 f32 (chunks_exact).
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr());
                _mm512_storeu_ps(x.as_mut_ptr(), _mm512_maskz_mov_ps(k, v));
            }
        }
    }
    keep_bits_generic(tail, &bits[whole..]);
}

multiversion! {
    /// `x = bf16(x · k)` (a rescaled task vector in bfloat16).
    pub fn scale_bf16(d: &mut [f32], k: f32) {
        for x in d.iter_mut() {
            *x = crate::dtype::bf16_round(*x * k);
        }
    }
}

multiversion! {
    /// `x = x · k`.
    pub fn scale(d: &mut [f32], k: f32) {
        for x in d.iter_mut() {
            *x *= k;
        }
    }
}

multiversion! {
    /// Counting-sort bins of `(k & 0x7FFF_FFFF) >> sh` (f32 bits as keys of
    /// |x|): `k - lo + 2` from `lo` up,
    /// 0 for `min`, 1 between.
    pub fn bins_of(keys: &[u32], sh: u32, lo: u32, min: u32, bins: &mut [u32]) {
        for (b, k) in bins.iter_mut().zip(keys) {
            // the sign bit of f32 bits is not part of the key
            let k = (k & 0x7FFF_FFFF) >> sh;
            let v = (k + 2).max(lo + 1) - lo;
            *b = if k == min { 0 } else { v };
        }
    }
}

/// Sums eight lanes of f64 in a fixed order.
#[inline(always)]
fn lanes(a: [f64; 8]) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// ([`abs_sum`] of `d`, the same sum over the elements whose flag is set),
/// each exactly as [`abs_sum`] computes it.
pub fn abs_sums(d: &[f32], f: &[u8]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::V4 {
        // SAFETY: `level` checked that the CPU has AVX-512F.
        return unsafe { abs_sums_v4(d, f) };
    }
    abs_sums_generic(d, f)
}

/// Lanes of the |x| sums: element `i` adds into lane `i % SUM_LANES`, so
/// that an AVX-512 loop runs four independent chains of eight.
const SUM_LANES: usize = 32;

/// [`abs_sums`] in plain Rust (LLVM does not vectorise it well).
fn abs_sums_generic(d: &[f32], f: &[u8]) -> (f64, f64) {
    let (mut a, mut b) = ([0f64; SUM_LANES], [0f64; SUM_LANES]);
    let n = d.len().min(f.len());
    for (i, (x, k)) in d[..n].iter().zip(&f[..n]).enumerate() {
        let v = x.abs() as f64;
        a[i % SUM_LANES] += v;
        b[i % SUM_LANES] += if *k != 0 { v } else { 0.0 };
    }
    (lanes32(&a), lanes32(&b))
}

/// Sums [`SUM_LANES`] lanes of f64 in a fixed order: four groups of eight
/// (each by [`lanes`]), then the groups pairwise.
#[inline(always)]
fn lanes32(a: &[f64; SUM_LANES]) -> f64 {
    let g = |k: usize| lanes(a[8 * k..8 * k + 8].try_into().expect("8 lanes"));
    (g(0) + g(1)) + (g(2) + g(3))
}

/// [`abs_sums`] with AVX-512: lane `l` of the accumulators adds the same
/// elements in the same order as the plain version.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn abs_sums_v4(d: &[f32], f: &[u8]) -> (f64, f64) {
    use std::arch::x86_64::*;
    let n = d.len().min(f.len());
    let whole = n / SUM_LANES * SUM_LANES;
    let mut a = [_mm512_setzero_pd(); 4];
    let mut b = [_mm512_setzero_pd(); 4];
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    for (x, k) in d[..whole]
        .chunks_exact(SUM_LANES)
        .zip(f[..whole].chunks_exact(SUM_LANES))
    {
        for q in 0..4 {
            // SAFETY: `x` holds 32 f32 and `k` 32 bytes (chunks_exact).
            let x = unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * q)) };
            let v = _mm512_cvtps_pd(_mm256_and_ps(x, absmask));
            a[q] = _mm512_add_pd(a[q], v);
            let k8 = u64::from_le_bytes(k[8 * q..8 * q + 8].try_into().expect("8"));
            let kw = _mm512_cvtepu8_epi64(_mm_cvtsi64_si128(k8 as i64));
            let m = _mm512_test_epi64_mask(kw, kw);
            // +v where flagged; else unchanged, as adding +0.0 leaves it
            b[q] = _mm512_mask_add_pd(b[q], m, b[q], v);
        }
    }
    let (mut aa, mut bb) = ([0f64; SUM_LANES], [0f64; SUM_LANES]);
    // SAFETY: 8 f64 per store, 32 in all.
    unsafe {
        for q in 0..4 {
            _mm512_storeu_pd(aa.as_mut_ptr().add(8 * q), a[q]);
            _mm512_storeu_pd(bb.as_mut_ptr().add(8 * q), b[q]);
        }
    }
    for (l, (x, k)) in d[whole..n].iter().zip(&f[whole..n]).enumerate() {
        let v = x.abs() as f64;
        aa[l] += v;
        bb[l] += if *k != 0 { v } else { 0.0 };
    }
    (lanes32(&aa), lanes32(&bb))
}

/// (Σa², Σb², Σab) in f64 (products exact), element `i` into lane `i % 8`,
/// lanes combined by [`lanes`]: slerp's per-block statistics.
pub fn sq_dot(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::V4 {
        // SAFETY: `level` checked that the CPU has AVX-512F.
        return unsafe { sq_dot_v4(a, b) };
    }
    sq_dot_generic(a, b)
}

fn sq_dot_generic(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    let (mut x, mut y, mut z) = ([0f64; 8], [0f64; 8], [0f64; 8]);
    for (i, (p, q)) in a.iter().zip(b).enumerate() {
        let (p, q) = (*p as f64, *q as f64);
        x[i % 8] += p * p;
        y[i % 8] += q * q;
        z[i % 8] += p * q;
    }
    (lanes(x), lanes(y), lanes(z))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn sq_dot_v4(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let whole = n / 8 * 8;
    let (mut x, mut y, mut z) = (
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
        _mm512_setzero_pd(),
    );
    for (p, q) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
        // SAFETY: 8 f32 each (chunks_exact).
        let (p, q) = unsafe { (_mm256_loadu_ps(p.as_ptr()), _mm256_loadu_ps(q.as_ptr())) };
        let (p, q) = (_mm512_cvtps_pd(p), _mm512_cvtps_pd(q));
        x = _mm512_add_pd(x, _mm512_mul_pd(p, p));
        y = _mm512_add_pd(y, _mm512_mul_pd(q, q));
        z = _mm512_add_pd(z, _mm512_mul_pd(p, q));
    }
    let (mut xx, mut yy, mut zz) = ([0f64; 8], [0f64; 8], [0f64; 8]);
    // SAFETY: 8 f64 each.
    unsafe {
        _mm512_storeu_pd(xx.as_mut_ptr(), x);
        _mm512_storeu_pd(yy.as_mut_ptr(), y);
        _mm512_storeu_pd(zz.as_mut_ptr(), z);
    }
    for (l, (p, q)) in a[whole..n].iter().zip(&b[whole..n]).enumerate() {
        let (p, q) = (*p as f64, *q as f64);
        xx[l] += p * p;
        yy[l] += q * q;
        zz[l] += p * q;
    }
    (lanes(xx), lanes(yy), lanes(zz))
}

multiversion! {
    /// `o[i] = c0·a[i] + c1·b[i]` (f32, no fused multiply-add).
    pub fn lerp2(o: &mut [f32], a: &[f32], b: &[f32], c0: f32, c1: f32) {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = c0 * a + c1 * b;
        }
    }
}

/// Σ|x| in f64, element `i` into lane `i % SUM_LANES`, lanes combined by
/// [`lanes32`]: the per-block partial sum of [`crate::methods::sum_abs`]
/// (equal to [`abs_sums`]' first value).
pub fn abs_sum(d: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::V4 {
        // SAFETY: `level` checked that the CPU has AVX-512F.
        return unsafe { abs_sum_v4(d) };
    }
    let mut a = [0f64; SUM_LANES];
    for (i, x) in d.iter().enumerate() {
        a[i % SUM_LANES] += x.abs() as f64;
    }
    lanes32(&a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn abs_sum_v4(d: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    let whole = d.len() / SUM_LANES * SUM_LANES;
    let mut a = [_mm512_setzero_pd(); 4];
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    for x in d[..whole].chunks_exact(SUM_LANES) {
        for (q, acc) in a.iter_mut().enumerate() {
            // SAFETY: `x` holds 32 f32 (chunks_exact).
            let x = unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * q)) };
            *acc = _mm512_add_pd(*acc, _mm512_cvtps_pd(_mm256_and_ps(x, absmask)));
        }
    }
    let mut aa = [0f64; SUM_LANES];
    // SAFETY: 8 f64 per store, 32 in all.
    unsafe {
        for (q, acc) in a.iter().enumerate() {
            _mm512_storeu_pd(aa.as_mut_ptr().add(8 * q), *acc);
        }
    }
    for (l, x) in d[whole..].iter().enumerate() {
        aa[l] += x.abs() as f64;
    }
    lanes32(&aa)
}
#[cfg(test)]
mod tests {
    /// Every variant gives the same bytes as the scalar definition.
    /// The AVX-512 sums add the same elements in the same order per lane as
    /// the plain ones: equal bits, NaN and infinities included.
    #[test]
    fn abs_sums_match_the_plain_definition() {
        let s = crate::rng::Stream::new(1, "sums", "x");
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 1000, 32768] {
            let d: Vec<f32> = (0..n as u64)
                .map(|i| match i % 97 {
                    5 => 0.0,
                    6 => -0.0,
                    7 if n == 1000 => f32::INFINITY,
                    _ => (s.uniform(i) - 0.5) * 1e3f32.powf(s.uniform(i + 7)),
                })
                .collect();
            let f: Vec<u8> = (0..n as u64)
                .map(|i| (s.uniform(i + 99) < 0.5) as u8 * 3)
                .collect();
            let (a, b) = super::abs_sums(&d, &f);
            let (ga, gb) = super::abs_sums_generic(&d, &f);
            assert_eq!(a.to_bits(), ga.to_bits(), "{n}");
            assert_eq!(b.to_bits(), gb.to_bits(), "{n}");
            assert_eq!(super::abs_sum(&d).to_bits(), ga.to_bits(), "{n}");
            let e: Vec<f32> = d.iter().rev().copied().collect();
            let (x, y, z) = super::sq_dot(&d, &e);
            let (gx, gy, gz) = super::sq_dot_generic(&d, &e);
            assert_eq!(
                (x.to_bits(), y.to_bits(), z.to_bits()),
                (gx.to_bits(), gy.to_bits(), gz.to_bits()),
                "{n}"
            );
        }
    }

    #[test]
    fn hardware_bf16_rounding_equals_bf16_round() {
        #[cfg(target_arch = "x86_64")]
        if super::bf16_native() {
            use std::arch::x86_64::*;
            // every high half with low halves around the rounding point,
            // subnormals, NaNs (quiet and signalling) and infinities among them
            let lows = [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234];
            let all: Vec<u32> = (0..=0xFFFFu32)
                .flat_map(|h| lows.iter().map(move |l| (h << 16) | l))
                .collect();
            for c in all.chunks_exact(16) {
                let x: Vec<f32> = c.iter().map(|b| f32::from_bits(*b)).collect();
                let mut y = [0f32; 16];
                // SAFETY: `bf16_native` checked the CPU; 16 lanes each.
                unsafe {
                    let v = super::r16(_mm512_loadu_ps(x.as_ptr()));
                    _mm512_storeu_ps(y.as_mut_ptr(), v);
                }
                for (a, b) in x.iter().zip(&y) {
                    let want = crate::dtype::bf16_round(*a);
                    assert_eq!(b.to_bits(), want.to_bits(), "{:08x}", a.to_bits());
                }
            }
            return;
        }
        eprintln!(
            "no AVX-512 BF16 on this CPU: the hardware rounding is not used, nothing to compare"
        );
    }

    #[test]
    fn bit_kernels_and_windowed_histograms_match_plain_loops() {
        let s = crate::rng::Stream::new(3, "bits", "x");
        for n in [0usize, 1, 15, 16, 17, 63, 64, 65, 1000, 1024, 1041, 5000] {
            let f: Vec<u8> = (0..n as u64)
                .map(|i| (s.uniform(i) < 0.4) as u8 * (1 + (i % 3) as u8))
                .collect();
            let words = n.div_ceil(64);
            let (mut a, mut b) = (vec![0u64; words], vec![0u64; words]);
            super::pack_flags(&f, &mut a);
            super::pack_flags_generic(&f, &mut b);
            assert_eq!(a, b, "{n}");
            for (j, x) in f.iter().enumerate() {
                assert_eq!((a[j / 64] >> (j % 64)) & 1 == 1, *x != 0);
            }
            let d: Vec<f32> = (0..n as u64)
                .map(|i| match i % 89 {
                    3 => -0.0,
                    4 => f32::NAN,
                    _ => (s.uniform(i + 5) - 0.5) * 1e-2,
                })
                .collect();
            let (mut x, mut y) = (d.clone(), d.clone());
            super::keep_bits(&mut x, &a);
            super::keep_bits_generic(&mut y, &a);
            let bits = |v: &[f32]| v.iter().map(|z| z.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x), bits(&y), "{n}");
            for flip in [0u32, u32::MAX] {
                let keys: Vec<u32> = d.iter().map(|v| super::key(*v, flip) >> 16).collect();
                let mut sorted = keys.clone();
                sorted.sort_unstable();
                for (lo, hi) in [
                    (0u32, 0xFFFF),
                    (
                        sorted.get(n / 3).copied().unwrap_or(7),
                        sorted.get(n / 2).copied().unwrap_or(9),
                    ),
                    (0x3C00, 0x3C00),
                    (0x8000, 0x7FFF),
                ] {
                    let (mut h1, mut h2) = (vec![0u32; 1 << 16], vec![0u32; 1 << 16]);
                    let a1 = super::hist_window(&d, flip, lo, hi, &mut h1);
                    let a2 = super::hist_window_generic(&d, flip, lo, hi, &mut h2);
                    assert_eq!(a1, a2, "{n} {lo} {hi}");
                    assert!(h1 == h2, "{n} {lo} {hi}");
                    assert_eq!(a1, keys.iter().filter(|k| **k > hi).count() as u64);
                    for k in &keys {
                        let want = keys.iter().filter(|q| *q == k).count() as u32;
                        let inw = *k >= lo && *k <= hi;
                        assert_eq!(h1[*k as usize], if inw { want } else { 0 }, "{n} {lo} {hi}");
                    }
                }
            }
        }
    }

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

    /// DARE's vector masks and DELLA's flags equal the scalar mask draw
    /// per element, also across a 2³² index boundary.
    #[test]
    fn mask_kernels_equal_scalar_draws() {
        let s = crate::rng::Stream::new(11, "mask", "dare:0");
        for e0 in [0u64, 5, (1 << 32) - 37, 3 << 33] {
            for n in [0usize, 1, 15, 16, 17, 1000] {
                let p = 0.37f32;
                let mut f = vec![9u8; n];
                super::random_flags(&mut f, s, e0, p);
                let mut d: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
                super::keep_random(&mut d, s, e0, p);
                let probs: Vec<f32> = (0..n).map(|i| s.uniform(i as u64)).collect();
                let mut g = vec![9u8; n];
                super::della_flags(&mut g, &probs, s, e0);
                for j in 0..n {
                    let keep = s.bernoulli(e0 + j as u64, p);
                    assert_eq!(f[j], keep as u8, "{e0} {j}");
                    assert_eq!(d[j], if keep { j as f32 + 1.0 } else { 0.0 });
                    assert_eq!(g[j], s.bernoulli(e0 + j as u64, probs[j]) as u8);
                }
            }
        }
    }
}
