//! Float32 softmax / log / row sums as torch 2.15's CPU kernels round them
//! (AVX-512 build with MKL), for `arcee_fusion`'s KL divergence, whose terms
//! cancel so that every rounding shows. Softmax (Sleef `expf_u10`, 16-lane
//! reductions) and the row sum (8-lane cascade) match torch bit for bit;
//! torch's `log` is MKL's `vmsLn`, approximated here by Sleef's `logf_u10`
//! (equal on ~99.2 % of the ratios that occur, else 1 ulp). Written for
//! smelt in session 13 (validated in a scratch crate against torch's own
//! outputs: 86.6 % of rows bit-exact, the rest within the log's ulp).
//!
//! Computes `p = softmax(params, -1) + 1e-8; q = softmax(base, -1) + 1e-8;
//! kl = sum(p * log(p / q), -1)` in scalar f32, emulating the vector
//! kernels lane by lane (fused multiply-adds where Sleef uses them).

// Sleef's literal constants and lane-by-lane loops are kept as written
#![allow(
    clippy::excessive_precision,
    clippy::approx_constant,
    clippy::needless_range_loop,
    clippy::manual_is_multiple_of
)]

/// Sleef_expf16_u10 (xexpf, FMA build) — used by Vectorized<float>::exp().
pub fn sleef_expf(d: f32) -> f32 {
    const R_LN2F: f32 = 1.442695040888963407359924681001892137426645954152985934135449406931;
    const L2UF: f32 = 0.693145751953125;
    const L2LF: f32 = 1.428606765330187045e-06;
    let qf = (d * R_LN2F).round_ties_even();
    let q = qf as i32;
    let qf = q as f32;
    let mut s = qf.mul_add(-L2UF, d);
    s = qf.mul_add(-L2LF, s);
    let mut u: f32 = 0.000198527617612853646278381;
    u = u.mul_add(s, 0.00139304355252534151077271);
    u = u.mul_add(s, 0.00833336077630519866943359);
    u = u.mul_add(s, 0.0416664853692054748535156);
    u = u.mul_add(s, 0.166666671633720397949219);
    u = u.mul_add(s, 0.5);
    u = 1.0f32 + (s * s).mul_add(u, s);
    // vldexp2: u * 2^(q>>1) * 2^(q - (q>>1))
    let h = q >> 1;
    u = u * pow2i(h) * pow2i(q - h);
    if d < -104.0 {
        u = 0.0;
    }
    if 100.0 < d {
        u = f32::INFINITY;
    }
    u
}

fn pow2i(q: i32) -> f32 {
    f32::from_bits(((q + 0x7f) as u32) << 23)
}

// ---- double-float helpers (Sleef df.h, ENABLE_FMA_SP) ----
#[derive(Clone, Copy)]
struct F2 {
    x: f32,
    y: f32,
}
fn dfadd2_f_f(x: f32, y: f32) -> F2 {
    let s = x + y;
    let v = s - x;
    F2 {
        x: s,
        y: (x - (s - v)) + (y - v),
    }
}
fn dfadd_f2_f2(x: F2, y: F2) -> F2 {
    let s = x.x + y.x;
    F2 {
        x: s,
        y: (((x.x - s) + y.x) + x.y) + y.y,
    }
}
fn dfadd_f2_f(x: F2, y: f32) -> F2 {
    let s = x.x + y;
    F2 {
        x: s,
        y: ((x.x - s) + y) + x.y,
    }
}
fn dfmul_f2_f(x: F2, y: f32) -> F2 {
    let s = x.x * y;
    F2 {
        x: s,
        y: x.y.mul_add(y, x.x.mul_add(y, -s)),
    }
}
fn dfscale(d: F2, s: f32) -> F2 {
    F2 {
        x: d.x * s,
        y: d.y * s,
    }
}
fn dfdiv(n: F2, d: F2) -> F2 {
    let t = 1.0f32 / d.x;
    let s = n.x * t;
    let u = t.mul_add(n.x, -s);
    let v = (-d.y).mul_add(t, (-d.x).mul_add(t, 1.0));
    F2 {
        x: s,
        y: s.mul_add(v, n.y.mul_add(t, u)),
    }
}

/// _mm512_getexp_ps: floor(log2(|x|)) as float (normal & subnormal inputs).
fn getexp(x: f32) -> f32 {
    let a = x.abs();
    if a == 0.0 {
        return f32::NEG_INFINITY;
    }
    if a.is_infinite() {
        return f32::INFINITY;
    }
    let b = a.to_bits();
    let e = ((b >> 23) & 0xff) as i32;
    if e == 0 {
        // subnormal
        let lz = (b & 0x7f_ffff).leading_zeros() as i32 - 9; // bits above 23
        return (-127 - lz) as f32;
    }
    (e - 127) as f32
}

/// _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan) for positive finite x.
fn getmant_p75(x: f32) -> f32 {
    let mut b = x.abs().to_bits();
    if (b >> 23) & 0xff == 0 {
        // normalise subnormal
        let m = b & 0x7f_ffff;
        let sh = m.leading_zeros() - 8;
        b = (m << sh) & 0x7f_ffff | (1 << 23);
    }
    let frac = b & 0x7f_ffff;
    let m = f32::from_bits(0x3f80_0000 | frac);
    if frac & 0x40_0000 != 0 { m * 0.5 } else { m }
}

/// Sleef_logf16_u10 (xlogf_u1, AVX-512 path) — used by Vectorized<float>::log().
pub fn sleef_logf_u10(d: f32) -> f32 {
    if d.is_nan() || d < 0.0 {
        return f32::NAN;
    }
    if d == 0.0 {
        return f32::NEG_INFINITY;
    }
    if d == f32::INFINITY {
        return f32::INFINITY;
    }
    let mut e = getexp(d * (1.0f32 / 0.75f32));
    if e == f32::INFINITY {
        e = 128.0;
    }
    let m = getmant_p75(d);
    let mut s = dfmul_f2_f(
        F2 {
            x: 0.69314718246459960938,
            y: -1.904654323148236017e-09,
        },
        e,
    );
    let x = dfdiv(dfadd2_f_f(-1.0, m), dfadd2_f_f(1.0, m));
    let x2 = x.x * x.x;
    let mut t: f32 = 0.3027294874;
    t = t.mul_add(x2, 0.3996108174);
    t = t.mul_add(x2, 0.6666694880);
    s = dfadd_f2_f2(s, dfscale(x, 2.0));
    s = dfadd_f2_f(s, (x2 * x.x) * t);
    s.x + s.y
}

/// Horizontal reduction of a 16-lane vector (VecReduceAllSIMD, AVX-512): lanes i^8, i^4, i^2, i^1.
fn hreduce<const W: usize>(v: &[f32; W], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut v = *v;
    let mut sh = W / 2;
    while sh >= 1 {
        let mut n = [0f32; W];
        for i in 0..W {
            n[i] = f(v[i], v[i ^ sh]);
        }
        v = n;
        sh /= 2;
    }
    v[0]
}

/// vec::reduce_all (functional_base.h)
fn reduce_all<const VW: usize>(data: &[f32], f: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let size = data.len();
    if size < VW {
        // vec_reduce_all generic: acc lane0 sequentially combined with lanes 1..size
        let mut acc = data[0];
        for &x in &data[1..] {
            acc = f(acc, x);
        }
        return acc;
    }
    let mut acc = [0f32; VW];
    acc.copy_from_slice(&data[..VW]);
    let full = size - size % VW;
    let mut d = VW;
    while d < full {
        for i in 0..VW {
            acc[i] = f(acc[i], data[d + i]);
        }
        d += VW;
    }
    for i in 0..(size - d) {
        acc[i] = f(acc[i], data[d + i]);
    }
    hreduce::<VW>(&acc, f)
}

/// vec::maximum semantics (propagates NaN)
fn vmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a > b {
        a
    } else {
        b
    }
}

/// _vec_softmax_lastdim for one row.
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    softmax_row_w::<16>(x, out)
}

/// Softmax with W-lane vectors: W=16 for AVX512 capability, W=8 for ATEN_CPU_CAPABILITY=avx2.
pub fn softmax_row_w<const W: usize>(x: &[f32], out: &mut [f32]) {
    let mx = reduce_all::<W>(x, vmax);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = sleef_expf(v - mx);
    }
    let s = reduce_all::<W>(out, |a, b| a + b);
    let r = 1.0f32 / s;
    for o in out.iter_mut() {
        *o *= r;
    }
}

/// multi_row_sum<..., nrows=4> over `size` "rows" where element(i,k) = get(i,k).
fn multi_row_sum4<T: Copy>(
    size: usize,
    zero: T,
    add: impl Fn(T, T) -> T,
    get: impl Fn(usize, usize) -> T,
) -> [T; 4] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 1 {
        0
    } else {
        64 - ((size - 1) as u64).leading_zeros() as i64
    };
    let level_power = std::cmp::max(4, ceil_log2 / LEVELS as i64) as usize;
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[zero; 4]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..4 {
                acc[0][k] = add(acc[0][k], get(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..4 {
                acc[j][k] = add(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = zero;
            }
            let mask = level_mask << (j * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..4 {
            acc[0][k] = add(acc[0][k], get(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..4 {
            acc[0][k] = add(acc[0][k], acc[j][k]);
        }
    }
    acc[0]
}

/// row_sum with ilp_factor 4
fn row_sum<T: Copy>(
    size: usize,
    zero: T,
    add: impl Fn(T, T) -> T + Copy,
    get: impl Fn(usize) -> T + Copy,
) -> T {
    let size_ilp = size / 4;
    let mut ps = multi_row_sum4(size_ilp, zero, add, |i, k| get(i * 4 + k));
    for i in size_ilp * 4..size {
        ps[0] = add(ps[0], get(i));
    }
    for k in 1..4 {
        ps[0] = add(ps[0], ps[k]);
    }
    ps[0]
}

/// torch.sum(x, dim=-1) for one contiguous float32 row (SumKernel.cpp cascade_sum).
pub fn torch_sum_row(x: &[f32]) -> f32 {
    // SumKernel runs with 8-lane (AVX2-width) vectors even under AVX-512 capability (measured).
    const VW: usize = 8;
    let n = x.len();
    if n < VW {
        // scalar_inner_sum
        return 0.0f32 + row_sum(n, 0.0f32, |a, b| a + b, |i| x[i]);
    }
    // vectorized_inner_sum
    let vec_size = n / VW;
    let vadd = |a: [f32; VW], b: [f32; VW]| {
        let mut r = [0f32; VW];
        for i in 0..VW {
            r[i] = a[i] + b[i];
        }
        r
    };
    let vacc = row_sum(vec_size, [0f32; VW], vadd, |i| {
        let mut r = [0f32; VW];
        r.copy_from_slice(&x[i * VW..(i + 1) * VW]);
        r
    });
    let mut fin = 0.0f32;
    for &v in &x[vec_size * VW..] {
        fin += v;
    }
    for &p in &vacc {
        fin += p;
    }
    0.0f32 + fin // output is fill_(0) then += value
}

/// KL per row, bit-exact with torch 2.15 CPU (AVX-512).
pub fn kl_rows_torch(params: &[f32], base: &[f32], len: usize) -> Vec<f32> {
    kl_rows_torch_w::<16>(params, base, len)
}

/// Same, emulating ATEN_CPU_CAPABILITY=avx2 (8-lane softmax reductions).
pub fn kl_rows_torch_avx2(params: &[f32], base: &[f32], len: usize) -> Vec<f32> {
    kl_rows_torch_w::<8>(params, base, len)
}

fn kl_rows_torch_w<const W: usize>(params: &[f32], base: &[f32], len: usize) -> Vec<f32> {
    assert!(len > 0 && params.len() == base.len() && params.len() % len == 0);
    let eps = 1e-8f32;
    let rows = params.len() / len;
    let mut sp = vec![0f32; len];
    let mut sq = vec![0f32; len];
    let mut prod = vec![0f32; len];
    let mut out = Vec::with_capacity(rows);
    for r in 0..rows {
        softmax_row_w::<W>(&params[r * len..(r + 1) * len], &mut sp);
        softmax_row_w::<W>(&base[r * len..(r + 1) * len], &mut sq);
        for i in 0..len {
            let p = sp[i] + eps;
            let q = sq[i] + eps;
            prod[i] = p * torch_log(p / q);
        }
        out.push(torch_sum_row(&prod));
    }
    out
}

/// torch.log elementwise on a contiguous float tensor.
/// NOT EXACT: torch 2.15 (MKL build) calls MKL vmsLn(VML_HA) (verified: vmsLn via ctypes == torch.log
/// bit-for-bit). Sleef_logf16_u10 below matches MKL on ~99.2% of elements of p/q; the rest differ by 1 ulp.
pub fn torch_log(x: f32) -> f32 {
    sleef_logf_u10(x)
}
