//! CPU kernels for the decoder's hot paths on x86-64 with AVX-512: a packed
//! f32 GEMM for the linear layers and the LM head, and a fused
//! log-softmax-and-pick for scoring. Elsewhere (no AVX-512, other
//! architectures, `SMELT_NO_SIMD` set, or a non-CPU device) the model keeps
//! candle's ops; both paths are tested against each other.
//!
//! The GEMM follows the BLIS/GotoBLAS loop structure, mirrored for a
//! row-major output: weights (`[n, k]`, fixed for the model's life) are
//! packed once at load into panels of `NR` output features × `kc` (≤ `KC`) depth;
//! each task packs `MR` rows of activations at a time (kept in L1) and runs
//! the `MR × NR` micro-kernel (24 zmm accumulators) over a column block of
//! weight panels that stays in L2.

use rayon::prelude::*;

/// Rows of activations per micro-tile (the broadcast side).
const MR: usize = 12;
/// Output features per micro-tile (two 16-lane vectors).
const NR: usize = 32;
/// Largest depth of one packed block; `k` is cut into equal blocks no
/// deeper than this (576 → 3 × 192 rather than 256 + 256 + 64).
const KC: usize = 256;
/// Weight panels per column block: `KC × NCP × NR` floats = 1 MiB (L2).
const NCP: usize = 32;
/// Row tiles meeting fewer weight panels than this are read in place, not
/// packed (measured: small models 10–20 % faster, large GEMMs slower).
const DIRECT_BELOW: usize = 8;
/// Micro-kernel steps to prefetch the weight stream ahead.
const PF: usize = 8;

/// Whether the packed kernels run on this CPU.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static A: OnceLock<bool> = OnceLock::new();
        *A.get_or_init(|| {
            std::env::var_os("SMELT_NO_SIMD").is_none() && is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix `[n, k]` packed for [`matmul`]: for each depth block of
/// `KC`, for each panel of `NR` features, `kc × NR` floats (features
/// contiguous; the last panel zero-padded).
pub struct Packed {
    n: usize,
    k: usize,
    /// Depth of the packed blocks (≤ KC).
    kc: usize,
    panels: usize,
    data: Vec<f32>,
}

impl Packed {
    /// Packs `w` (`[n, k]`, row-major).
    pub fn new(w: &[f32], n: usize, k: usize) -> Packed {
        assert_eq!(
            w.len(),
            n * k,
            "packed weight: {n}×{k} expects {} values",
            n * k
        );
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * NR * k];
        // One depth block per task.
        let kc = k.div_ceil(k.div_ceil(KC).max(1)).max(1);
        data.par_chunks_mut((panels * NR * kc).max(1))
            .enumerate()
            .for_each(|(pb, blk)| {
                let p0 = pb * kc;
                let kcl = kc.min(k - p0);
                for (jp, dst) in blk.chunks_mut(kcl * NR).enumerate() {
                    for j in 0..NR.min(n - jp * NR) {
                        let src = &w[(jp * NR + j) * k + p0..][..kcl];
                        for (kk, &v) in src.iter().enumerate() {
                            dst[kk * NR + j] = v;
                        }
                    }
                }
            });
        Packed {
            n,
            k,
            kc,
            panels,
            data,
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Panel `jp` of the depth block starting at `p0` (`kcl` deep).
    fn panel(&self, p0: usize, kcl: usize, jp: usize) -> &[f32] {
        &self.data[p0 * self.panels * NR + jp * kcl * NR..][..kcl * NR]
    }
}

/// A raw output pointer shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint rectangles of the output (see `matmul`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the whole `Out`).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `out[m × n] = x[m × k] · wᵀ`; every element of `out` is written.
/// Panics if the CPU lacks AVX-512 (check [`available`]) or lengths differ.
pub fn matmul(x: &[f32], m: usize, w: &Packed, out: &mut [f32]) {
    assert_eq!(
        out.len(),
        m * w.n,
        "matmul: out has {} values, expected {m}×{}",
        out.len(),
        w.n
    );
    // SAFETY: `out` holds m × n floats.
    unsafe { run(x, m, w, Out(out.as_mut_ptr())) }
}

/// `x[m × k] · wᵀ` as a new `m × n` vector (not zeroed first).
pub fn matmul_vec(x: &[f32], m: usize, w: &Packed) -> Vec<f32> {
    let len = m * w.n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the buffer holds `len` floats and `run` writes every one of
    // them (the first depth block stores, later ones accumulate) before the
    // length is set.
    unsafe {
        run(x, m, w, Out(out.as_mut_ptr()));
        out.set_len(len);
    }
    out
}

/// SAFETY: `out` points to `m × w.n` writable floats.
unsafe fn run(x: &[f32], m: usize, w: &Packed, o: Out) {
    assert!(available(), "cpu::matmul needs AVX-512");
    let (n, k) = (w.n, w.k);
    assert_eq!(
        x.len(),
        m * k,
        "matmul: x has {} values, expected {m}×{k}",
        x.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m * n {
            // SAFETY: inside the m × n output.
            unsafe { o.0.add(i).write(0.0) };
        }
        return;
    }
    // Tasks: row ranges (multiples of MR) or panel ranges. A row task
    // reads all the weights (from L3 when they fit) and packs each row tile
    // once per column block; a panel task reads all the activations and
    // packs them once per panel range. Rows, unless the weights are much
    // larger (the LM head: then each panel is read from memory once) or
    // there are too few rows to share out (decoding).
    let threads = rayon::current_num_threads().max(1);
    let tiles = m.div_ceil(MR);
    let (row_tasks, col_tasks) = if n < 4 * m && tiles >= 2 * threads {
        ((4 * threads).min(tiles.div_ceil(8)).max(threads), 1)
    } else {
        (1, (4 * threads).min(w.panels))
    };
    let rows_per = tiles.div_ceil(row_tasks) * MR;
    let panels_per = w.panels.div_ceil(col_tasks);
    let tasks: Vec<(usize, usize)> = (0..m)
        .step_by(rows_per)
        .flat_map(|r0| (0..w.panels).step_by(panels_per).map(move |j0| (r0, j0)))
        .collect();
    tasks.into_par_iter().for_each(|(r0, j0)| {
        let r1 = (r0 + rows_per).min(m);
        let j1 = (j0 + panels_per).min(w.panels);
        // SAFETY: AVX-512 checked above; this task writes rows r0..r1 ×
        // features of panels j0..j1 only, which no other task touches, and
        // the output outlives the parallel loop.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            task(x, w, o, r0, r1, j0, j1)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, o, r0, r1, j0, j1);
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn task(x: &[f32], w: &Packed, out: Out, r0: usize, r1: usize, j0: usize, j1: usize) {
    let (n, k) = (w.n, w.k);
    let mut apack = [0f32; MR * KC];
    let mut tile = [0f32; MR * NR];
    for jc in (j0..j1).step_by(NCP) {
        let jce = (jc + NCP).min(j1);
        for p0 in (0..k).step_by(w.kc) {
            let kcl = w.kc.min(k - p0);
            let acc = p0 > 0;
            for i0 in (r0..r1).step_by(MR) {
                let rows = MR.min(r1 - i0);
                // Full row tiles are read in place when the weight panels
                // are few (packing would cost as much as the products);
                // otherwise, and for the last partial tile, packed.
                let direct = rows == MR && jce - jc < DIRECT_BELOW;
                if !direct {
                    for i in 0..MR {
                        if i < rows {
                            let src = &x[(i0 + i) * k + p0..][..kcl];
                            for (kk, &v) in src.iter().enumerate() {
                                apack[kk * MR + i] = v;
                            }
                        } else {
                            for kk in 0..kcl {
                                apack[kk * MR + i] = 0.0;
                            }
                        }
                    }
                }
                let a = if direct {
                    x[i0 * k + p0..].as_ptr()
                } else {
                    apack.as_ptr()
                };
                for jp in jc..jce {
                    let cols = NR.min(n - jp * NR);
                    let b = w.panel(p0, kcl, jp).as_ptr();
                    // SAFETY: the tile lies inside `out` (rows < m, features
                    // < n); partial tiles go through `tile`. Direct tiles
                    // read MR whole rows of x.
                    unsafe {
                        let c = out.0.add(i0 * n + jp * NR);
                        if rows == MR && cols == NR {
                            if direct {
                                kernel::<false>(kcl, a, k, b, c, n, acc);
                            } else {
                                kernel::<true>(kcl, a, 1, b, c, n, acc);
                            }
                        } else {
                            for i in 0..rows {
                                for j in 0..cols {
                                    tile[i * NR + j] = if acc { *c.add(i * n + j) } else { 0.0 };
                                }
                            }
                            if direct {
                                kernel::<false>(kcl, a, k, b, tile.as_mut_ptr(), NR, true);
                            } else {
                                kernel::<true>(kcl, a, 1, b, tile.as_mut_ptr(), NR, true);
                            }
                            for i in 0..rows {
                                for j in 0..cols {
                                    *c.add(i * n + j) = tile[i * NR + j];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The `MR × NR` micro-kernel: `c (+)= a · b` over `kc` steps; `a` packed
/// `kc × MR` (`PACKED`) or MR rows `lda` apart, `b` packed `kc × NR`, `c`
/// rows `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel<const PACKED: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    use std::arch::x86_64::*;
    let mut c0 = [_mm512_setzero_ps(); MR];
    let mut c1 = [_mm512_setzero_ps(); MR];
    // SAFETY: the caller guarantees kc × MR floats at `a`, kc × NR at `b`
    // and an MR × NR tile at `c` with row stride `ldc`.
    unsafe {
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            // The weight panels stream from L2: fetch PF steps ahead.
            _mm_prefetch::<_MM_HINT_T0>(b.add(NR * PF) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(b.add(NR * PF + 16) as *const i8);
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for i in 0..MR {
                let ai = _mm512_set1_ps(*a.add(if PACKED { i } else { i * lda }));
                c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
                c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
            }
            a = a.add(if PACKED { MR } else { 1 });
            b = b.add(NR);
        }
        for i in 0..MR {
            let p = c.add(i * ldc);
            let (mut v0, mut v1) = (c0[i], c1[i]);
            if acc {
                v0 = _mm512_add_ps(v0, _mm512_loadu_ps(p));
                v1 = _mm512_add_ps(v1, _mm512_loadu_ps(p.add(16)));
            }
            _mm512_storeu_ps(p, v0);
            _mm512_storeu_ps(p.add(16), v1);
        }
    }
}

/// For each row of `logits` (`rows × vocab`), `logits[t] − logsumexp(row)`
/// with `t = targets[row]`: log-softmax and gather in one pass per row.
pub fn pick_logprobs(logits: &[f32], vocab: usize, targets: &[u32], out: &mut [f32]) {
    assert!(available(), "cpu::pick_logprobs needs AVX-512");
    assert_eq!(logits.len(), targets.len() * vocab);
    assert_eq!(out.len(), targets.len());
    out.par_iter_mut()
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .for_each(|((o, row), &t)| {
            // SAFETY: AVX-512 checked above.
            #[cfg(target_arch = "x86_64")]
            let lse = unsafe { logsumexp(row) };
            #[cfg(not(target_arch = "x86_64"))]
            let lse = 0.0;
            *o = row[t as usize] - lse;
        });
}

/// `ln Σ exp(x)`, max-shifted, f32 lanes with a vectorised `exp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn logsumexp(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mx = max_of(x);
    if !mx.is_finite() {
        return mx; // all −inf (or a NaN/inf present): as the plain formula
    }
    let (chunks, tail) = x.split_at(x.len() / 16 * 16);
    let m = _mm512_set1_ps(mx);
    let mut s0 = _mm512_setzero_ps();
    let mut s1 = _mm512_setzero_ps();
    let mut it = chunks.chunks_exact(32);
    for c in &mut it {
        // SAFETY: 32 floats in `c`.
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_ps(c.as_ptr()),
                _mm512_loadu_ps(c.as_ptr().add(16)),
            )
        };
        s0 = _mm512_add_ps(s0, exp512(_mm512_sub_ps(v0, m)));
        s1 = _mm512_add_ps(s1, exp512(_mm512_sub_ps(v1, m)));
    }
    for c in it.remainder().chunks_exact(16) {
        // SAFETY: 16 floats in `c`.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        s0 = _mm512_add_ps(s0, exp512(_mm512_sub_ps(v, m)));
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for &v in tail {
        s += (v - mx).exp();
    }
    mx + s.ln()
}

/// The largest value of `x` (−inf when empty), NaN-ignoring as `f32::max`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn max_of(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut it = x.chunks_exact(16);
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in &mut it {
        // SAFETY: 16 floats in `c`. `max_ps(v, m)` keeps `m` where `v` is NaN.
        m = _mm512_max_ps(unsafe { _mm512_loadu_ps(c.as_ptr()) }, m);
    }
    let mut mx = _mm512_reduce_max_ps(m);
    for &v in it.remainder() {
        mx = mx.max(v);
    }
    mx
}

/// `g ← silu(g) · u` (SwiGLU's gate times up), elementwise, in parallel.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert!(available(), "cpu::silu_mul needs AVX-512");
    assert_eq!(g.len(), u.len());
    g.par_chunks_mut(1 << 14)
        .zip(u.par_chunks(1 << 14))
        .for_each(|(g, u)| {
            // SAFETY: AVX-512 checked above.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                silu_mul_chunk(g, u)
            }
        });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn silu_mul_chunk(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let n = g.len() / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        // SAFETY: i + 16 ≤ n ≤ len of both.
        unsafe {
            let x = _mm512_loadu_ps(g.as_ptr().add(i));
            let y = _mm512_loadu_ps(u.as_ptr().add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let s = _mm512_div_ps(x, _mm512_add_ps(one, e));
            _mm512_storeu_ps(g.as_mut_ptr().add(i), _mm512_mul_ps(s, y));
        }
    }
    for i in n..g.len() {
        let x = g[i];
        g[i] = x / (1.0 + (-x).exp()) * u[i];
    }
}

/// RMS norm of each row of `x` (rows of `w.len()` values):
/// `x / sqrt(mean(x²) + eps) · w`, as transformers' LlamaRMSNorm.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    rms_norm_inplace(&mut out, w, eps);
    out
}

/// [`rms_norm`] in place.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    assert!(available(), "cpu::rms_norm needs AVX-512");
    let d = w.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms_norm: {} values in rows of {d}",
        x.len()
    );
    let rows_per = (1usize << 14).div_ceil(d).max(1);
    x.par_chunks_mut(rows_per * d).for_each(|chunk| {
        for row in chunk.chunks_mut(d) {
            // SAFETY: AVX-512 checked above.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                norm_row(row, w, eps)
            }
        }
    });
}

/// `x += y` elementwise, then `x`'s rows RMS-normed into a new vector:
/// a residual add and the next norm in one pass.
pub fn add_rms_norm(x: &mut [f32], y: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    assert!(available(), "cpu::add_rms_norm needs AVX-512");
    assert_eq!(x.len(), y.len());
    let d = w.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms_norm: {} values in rows of {d}",
        x.len()
    );
    let mut out = vec![0f32; x.len()];
    let per = (1usize << 14).div_ceil(d).max(1) * d;
    x.par_chunks_mut(per)
        .zip(y.par_chunks(per))
        .zip(out.par_chunks_mut(per))
        .for_each(|((x, y), o)| {
            for (a, &b) in x.iter_mut().zip(y) {
                *a += b;
            }
            o.copy_from_slice(x);
            for row in o.chunks_mut(d) {
                // SAFETY: AVX-512 checked above.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    norm_row(row, w, eps)
                }
            }
        });
    out
}

/// `x += y` elementwise.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    x.par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(x, y)| {
            for (a, &b) in x.iter_mut().zip(y) {
                *a += b;
            }
        });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn norm_row(row: &mut [f32], w: &[f32], eps: f32) {
    // Sixteen partial sums, so that the loop vectorises.
    let mut acc = [0f32; 16];
    let mut it = row.chunks_exact(16);
    for c in &mut it {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for &v in it.remainder() {
        sum += v * v;
    }
    let r = 1.0 / (sum / row.len() as f32 + eps).sqrt();
    for (v, &g) in row.iter_mut().zip(w) {
        *v = *v * r * g;
    }
}

/// Rotary embedding in place on token-major rows (`x`: `[n, heads, hd]`),
/// rotating the first `2 · half` values of each head as transformers'
/// rotate_half: `(x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin)`, with
/// `cos`/`sin` `[n, half]` (per token).
pub fn rope(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = if x.is_empty() {
        0
    } else {
        cos.len() / (x.len() / (heads * hd))
    };
    assert!(2 * half <= hd, "rope: {half} pairs in a head of {hd}");
    assert_eq!(cos.len(), sin.len());
    if half == 0 {
        return;
    }
    x.par_chunks_mut(heads * hd)
        .zip(cos.par_chunks(half))
        .zip(sin.par_chunks(half))
        .for_each(|((tok, c), s)| {
            for head in tok.chunks_mut(hd) {
                let (x1, rest) = head.split_at_mut(half);
                let x2 = &mut rest[..half];
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        });
}

/// Shapes of one attention call: `b` sequences, `nh` query heads over
/// `nkv` key/value heads, `t` queries and `tk` keys per sequence, `hd`
/// values per head.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub nh: usize,
    pub nkv: usize,
    pub t: usize,
    pub tk: usize,
    pub hd: usize,
}

/// Scaled dot-product attention with an additive mask, fused (scores,
/// mask, softmax and the weighted sum never leave L1): `q` `[b, t, nh, hd]`
/// (the query projection's output as it is),
/// `k`/`v` `[b, nkv, tk, hd]`, `mask` `[b, t, tk]` (0 or −inf); returns
/// `[b, t, nh · hd]`, the layout the output projection reads. Query head
/// `h` reads key/value head `h / (nh / nkv)`, as transformers' repeat_kv.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    s: AttnShape,
    scale: f32,
) -> Vec<f32> {
    assert!(available(), "cpu::attention needs AVX-512");
    let AttnShape {
        b,
        nh,
        nkv,
        t,
        tk,
        hd,
    } = s;
    assert!(
        nkv > 0 && nh % nkv == 0,
        "attention: {nh} heads over {nkv} kv heads"
    );
    assert_eq!(q.len(), b * nh * t * hd);
    assert_eq!(k.len(), b * nkv * tk * hd);
    assert_eq!(v.len(), b * nkv * tk * hd);
    assert_eq!(mask.len(), b * t * tk);
    let rep = nh / nkv;
    let mut out = vec![0f32; b * t * nh * hd];
    let o = Out(out.as_mut_ptr());
    // One task per key/value head of a sequence: its keys are transposed
    // once for the `rep` query heads that read them.
    (0..b * nkv).into_par_iter().for_each(|bk| {
        let (bi, g) = (bk / nkv, bk % nkv);
        let kv = bk * tk * hd;
        for h in g * rep..(g + 1) * rep {
            // SAFETY: AVX-512 checked above; this task writes the columns
            // h·hd..(h+1)·hd of sequence bi's rows, for its own heads only.
            #[cfg(target_arch = "x86_64")]
            KT.with_borrow_mut(|kt| unsafe {
                if h == g * rep {
                    transpose_keys(&k[kv..][..tk * hd], tk, hd, kt);
                }
                attend_head(
                    &q[bi * t * nh * hd + h * hd..][..(t - 1) * nh * hd + hd],
                    nh * hd,
                    kt,
                    &v[kv..][..tk * hd],
                    &mask[bi * t * tk..][..t * tk],
                    o.ptr().add(bi * t * nh * hd + h * hd),
                    nh * hd,
                    (t, tk, hd),
                    scale,
                )
            });
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (o, kv, bi, scale);
    });
    out
}

thread_local! {
    /// Transposed keys of the key/value head a thread is working on.
    static KT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `k` (`[tk, hd]`) → `kt` (`[hd, tkp]`, `tkp` = `tk` rounded up to 16,
/// padding zero), so that a query's scores accumulate 16 keys per vector.
fn transpose_keys(k: &[f32], tk: usize, hd: usize, kt: &mut Vec<f32>) {
    let tkp = tk.div_ceil(16) * 16;
    kt.clear();
    kt.resize(hd * tkp, 0.0);
    for j0 in (0..tk).step_by(16) {
        for d in 0..hd {
            let row = &mut kt[d * tkp + j0..][..16.min(tk - j0)];
            for (jj, slot) in row.iter_mut().enumerate() {
                *slot = k[(j0 + jj) * hd + d];
            }
        }
    }
}

/// `out[v] = Σ_d q[d] · kt[d][j0 + 16v ..]` for `NV` vectors of keys: NV
/// independent FMA chains held in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scores_block<const NV: usize>(q: &[f32], kt: *const f32, tkp: usize, out: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); NV];
    // SAFETY: the caller guarantees q.len() rows of `tkp` floats at `kt`
    // with NV vectors from the start, and NV vectors at `out`.
    unsafe {
        for (d, &qd) in q.iter().enumerate() {
            let qv = _mm512_set1_ps(qd);
            let row = kt.add(d * tkp);
            for (v, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(row.add(16 * v)), *a);
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(16 * v), *a);
        }
    }
}

/// `acc[d..] = Σ_j p[j] · v[j][d..]` for `NV` vectors of a head's values,
/// the keys split over `U` interleaved partial sums so that at least four
/// FMA chains run side by side when NV is small.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn values_block<const NV: usize, const U: usize>(
    p: &[f32],
    v: *const f32,
    hd: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; U];
    // SAFETY: the caller guarantees p.len() rows of `hd` floats at `v`
    // with NV vectors from the start, and NV vectors at `out`.
    unsafe {
        let mut it = p.chunks_exact(U);
        let mut j = 0;
        for pc in &mut it {
            for (u, &pj) in pc.iter().enumerate() {
                let pv = _mm512_set1_ps(pj);
                let row = v.add((j + u) * hd);
                for (x, a) in acc[u].iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(pv, _mm512_loadu_ps(row.add(16 * x)), *a);
                }
            }
            j += U;
        }
        for (u, &pj) in it.remainder().iter().enumerate() {
            let pv = _mm512_set1_ps(pj);
            let row = v.add((j + u) * hd);
            for (x, a) in acc[u].iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(pv, _mm512_loadu_ps(row.add(16 * x)), *a);
            }
        }
        for x in 0..NV {
            let mut s = acc[0][x];
            for a in &acc[1..] {
                s = _mm512_add_ps(s, a[x]);
            }
            _mm512_storeu_ps(out.add(16 * x), s);
        }
    }
}

/// The index of the last entry of `m` that is not −inf.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn last_visible(m: &[f32]) -> Option<usize> {
    use std::arch::x86_64::*;
    let full = m.len() / 16 * 16;
    if let Some(j) = m[full..].iter().rposition(|&x| x != f32::NEG_INFINITY) {
        return Some(full + j);
    }
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in (0..full).step_by(16).rev() {
        // SAFETY: c + 16 ≤ full ≤ m.len().
        let v = unsafe { _mm512_loadu_ps(m.as_ptr().add(c)) };
        let bits = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, ninf);
        if bits != 0 {
            return Some(c + 15 - bits.leading_zeros() as usize);
        }
    }
    None
}

/// One head of one sequence, keys transposed (`kt`, see
/// [`transpose_keys`]); output rows `ldo` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_head(
    q: &[f32],
    ldq: usize,
    kt: &[f32],
    v: &[f32],
    mask: &[f32],
    out: *mut f32,
    ldo: usize,
    (t, tk, hd): (usize, usize, usize),
    scale: f32,
) {
    use std::arch::x86_64::*;
    let tkp = tk.div_ceil(16) * 16;
    let hdp = hd.div_ceil(16) * 16;
    let mut sc = vec![0f32; tkp];
    let mut qs = vec![0f32; hd];
    let mut acc = vec![0f32; hdp];
    // Values padded to whole vectors when hd is not a multiple of 16.
    let vp: std::borrow::Cow<[f32]> = if hd == hdp {
        std::borrow::Cow::Borrowed(v)
    } else {
        let mut p = vec![0f32; tk * hdp];
        for j in 0..tk {
            p[j * hdp..][..hd].copy_from_slice(&v[j * hd..][..hd]);
        }
        std::borrow::Cow::Owned(p)
    };
    for i in 0..t {
        let m = &mask[i * tk..][..tk];
        // Keys past the last visible one are skipped (causal rows).
        let Some(last) = last_visible(m) else {
            // Nothing visible (never built by the model): zeros, as a
            // softmax over no keys has no defined value.
            continue;
        };
        let len = (last + 1).div_ceil(16) * 16;
        for (d, x) in qs.iter_mut().enumerate() {
            *x = q[i * ldq + d] * scale;
        }
        // SAFETY: blocks stay within `len` ≤ tkp columns of `kt` / `sc`.
        unsafe {
            let mut j = 0;
            while j < len {
                let left = (len - j) / 16;
                let (kp, sp) = (kt.as_ptr().add(j), sc.as_mut_ptr().add(j));
                j += 16
                    * match left {
                        8.. => {
                            scores_block::<8>(&qs, kp, tkp, sp);
                            8
                        }
                        4..=7 => {
                            scores_block::<4>(&qs, kp, tkp, sp);
                            4
                        }
                        2..=3 => {
                            scores_block::<2>(&qs, kp, tkp, sp);
                            2
                        }
                        _ => {
                            scores_block::<1>(&qs, kp, tkp, sp);
                            1
                        }
                    };
            }
        }
        for (s, &mj) in sc[..=last].iter_mut().zip(m) {
            *s += mj;
        }
        sc[last + 1..len].fill(f32::NEG_INFINITY);
        let mx = max_of(&sc[..len]);
        let mv = _mm512_set1_ps(mx);
        let mut sum = _mm512_setzero_ps();
        for c in sc[..len].chunks_exact_mut(16) {
            // SAFETY: 16 floats in `c`.
            unsafe {
                let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), mv));
                sum = _mm512_add_ps(sum, e);
                _mm512_storeu_ps(c.as_mut_ptr(), e);
            }
        }
        let inv = 1.0 / _mm512_reduce_add_ps(sum);
        // SAFETY: blocks stay within `hdp` columns of `vp` rows / `acc`.
        unsafe {
            let p = &sc[..=last];
            let mut d = 0;
            while d < hdp {
                let left = (hdp - d) / 16;
                let (vv, ap) = (vp.as_ptr().add(d), acc.as_mut_ptr().add(d));
                d += 16
                    * match left {
                        8.. => {
                            values_block::<8, 1>(p, vv, hdp, ap);
                            8
                        }
                        4..=7 => {
                            values_block::<4, 1>(p, vv, hdp, ap);
                            4
                        }
                        2..=3 => {
                            values_block::<2, 2>(p, vv, hdp, ap);
                            2
                        }
                        _ => {
                            values_block::<1, 4>(p, vv, hdp, ap);
                            1
                        }
                    };
            }
        }
        for (d, &a) in acc[..hd].iter().enumerate() {
            // SAFETY: row i of this head's output columns.
            unsafe { *out.add(i * ldo + d) = a * inv };
        }
    }
}

/// `exp(x)` for 16 lanes, within ~2 ulp for x ≤ 0 (underflows to 0 below
/// about −103): `x = n·ln2 + r`, degree-6 polynomial on `|r| ≤ ln2/2`, then
/// scaled by `2ⁿ`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let x = _mm512_min_ps(x, _mm512_set1_ps(88.5));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // r = x − n·ln2 in two steps (Cody–Waite).
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 120.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 24.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 6.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Against a plain f64 triple loop, for shapes with partial tiles,
    /// several depth blocks, and both the row and the column split.
    #[test]
    fn matmul_matches_the_definition() {
        if !available() {
            eprintln!("no AVX-512 here: the packed GEMM is not used (candle's matmul is)");
            assert!(!available());
            return;
        }
        let mut seed = 7;
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 7),
            (12, 256, 32),
            (13, 257, 33),
            (100, 600, 70),
            (300, 513, 1100),
            (3, 768, 2048),
            (40, 576, 64),
            (2, 0, 5),
            (2, 5, 0),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let p = Packed::new(&w, n, k);
            let mut out = vec![f32::NAN; m * n];
            matmul(&x, m, &p, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - r).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                        "{m}×{k}×{n} at ({i},{j}): {got} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn pick_logprobs_matches_log_softmax() {
        if !available() {
            assert!(!available());
            return;
        }
        let mut seed = 3;
        let vocab = 1000 + 37; // a tail after the 16-lane chunks
        let rows = 9;
        let mut logits: Vec<f32> = (0..rows * vocab).map(|_| 30.0 * lcg(&mut seed)).collect();
        logits[5] = f32::NEG_INFINITY; // masked entries are fine
        let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 97) % vocab as u32).collect();
        let mut out = vec![0f32; rows];
        pick_logprobs(&logits, vocab, &targets, &mut out);
        for r in 0..rows {
            let row = &logits[r * vocab..][..vocab];
            let mx = row
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let s: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
            let want = row[targets[r] as usize] as f64 - mx - s.ln();
            assert!(
                (out[r] as f64 - want).abs() < 1e-5,
                "row {r}: {} vs {want}",
                out[r]
            );
        }
    }

    #[test]
    fn silu_mul_matches_the_definition() {
        if !available() {
            assert!(!available());
            return;
        }
        let mut seed = 11;
        let n = 3 * (1 << 14) + 21;
        let mut g: Vec<f32> = (0..n).map(|_| 20.0 * lcg(&mut seed)).collect();
        g[0] = -120.0;
        g[1] = 100.0;
        let u: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&x, &y)| x as f64 / (1.0 + (-x as f64).exp()) * y as f64)
            .collect();
        silu_mul(&mut g, &u);
        for (i, (&got, &w)) in g.iter().zip(&want).enumerate() {
            assert!(
                (got as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{i}: {got} vs {w}"
            );
        }
    }

    /// Against scores → mask → softmax → weighted sum in f64, with GQA,
    /// padded keys, a causal mask and a row that sees one key only.
    #[test]
    fn attention_matches_the_definition() {
        if !available() {
            assert!(!available());
            return;
        }
        let mut seed = 5;
        for &(b, nh, nkv, t, tk, hd) in &[
            (2usize, 4usize, 2usize, 5usize, 5usize, 8usize),
            (1, 6, 2, 3, 37, 64),
            (3, 2, 2, 17, 17, 16),
        ] {
            let s = AttnShape {
                b,
                nh,
                nkv,
                t,
                tk,
                hd,
            };
            let q: Vec<f32> = (0..b * nh * t * hd).map(|_| lcg(&mut seed)).collect();
            let k: Vec<f32> = (0..b * nkv * tk * hd).map(|_| lcg(&mut seed)).collect();
            let v: Vec<f32> = (0..b * nkv * tk * hd).map(|_| lcg(&mut seed)).collect();
            let past = tk - t;
            let mut mask = vec![0f32; b * t * tk];
            for bi in 0..b {
                for i in 0..t {
                    for j in 0..tk {
                        // causal, and sequence 1 cannot see key 0 (padding)
                        if j > past + i || (bi == 1 && j == 0 && past + i > 0) {
                            mask[(bi * t + i) * tk + j] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            let scale = 1.0 / (hd as f32).sqrt();
            let out = attention(&q, &k, &v, &mask, s, scale);
            let rep = nh / nkv;
            for bi in 0..b {
                for h in 0..nh {
                    let kv = (bi * nkv + h / rep) * tk * hd;
                    for i in 0..t {
                        let qi = &q[((bi * t + i) * nh + h) * hd..][..hd];
                        let sc: Vec<f64> = (0..tk)
                            .map(|j| {
                                let d: f64 = (0..hd)
                                    .map(|x| qi[x] as f64 * k[kv + j * hd + x] as f64)
                                    .sum();
                                d * scale as f64 + mask[(bi * t + i) * tk + j] as f64
                            })
                            .collect();
                        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let p: Vec<f64> = sc.iter().map(|&x| (x - mx).exp()).collect();
                        let z: f64 = p.iter().sum();
                        for d in 0..hd {
                            let want: f64 = (0..tk)
                                .map(|j| p[j] * v[kv + j * hd + d] as f64)
                                .sum::<f64>()
                                / z;
                            let got = out[(bi * t + i) * nh * hd + h * hd + d] as f64;
                            assert!(
                                (got - want).abs() < 2e-6,
                                "{s:?} b{bi} h{h} i{i} d{d}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn last_visible_finds_the_last_finite_entry() {
        if !available() {
            assert!(!available());
            return;
        }
        for len in [0usize, 1, 15, 16, 17, 40, 64] {
            for last in 0..=len {
                // entries after `last` masked; `last == len` means all masked
                let m: Vec<f32> = (0..len)
                    .map(|j| {
                        if j <= last && last < len {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                // SAFETY: AVX-512 checked above.
                let got = unsafe { last_visible(&m) };
                assert_eq!(got, (last < len).then_some(last), "len {len} last {last}");
            }
        }
    }
}
