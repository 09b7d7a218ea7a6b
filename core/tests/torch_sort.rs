//! `smelt_core::torch_sort` against torch itself: 228 vectors (sizes 1 to
//! 8,000; few-level integers, bfloat16 task-vector magnitudes with many
//! exact zeros, ±0, NaN, sorted / reversed / all-equal, and McIlroy
//! "killer" inputs that drive introsort into its heap-sort fallback) with
//! the permutations torch 2.15 (CPU) returned for
//! `torch.argsort(w, descending=True)` and `torch.sort(w).indices`.
//! Written by /tmp/torchsort/gen.py (session 13); format per vector:
//! `b"TSV1", u32 n, u32 kind, f32 w[n], u32 desc[n], u32 asc[n]`.

use smelt_core::torch_sort::{
    argsort_asc, argsort_desc, asc_range, heap_fallback_count, top_k_desc, topk_largest_mask,
};

struct Vector {
    w: Vec<f32>,
    desc: Vec<u32>,
    asc: Vec<u32>,
}

fn vectors() -> Vec<Vector> {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/torch_sort_vectors.bin"
    ))
    .expect("tests/data/torch_sort_vectors.bin");
    let u32_at = |p: usize| u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap());
    let mut out = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        assert_eq!(&bytes[p..p + 4], b"TSV1");
        let n = u32_at(p + 4) as usize;
        p += 12;
        let w = (0..n).map(|i| f32::from_bits(u32_at(p + 4 * i))).collect();
        let desc = (0..n).map(|i| u32_at(p + 4 * (n + i))).collect();
        let asc = (0..n).map(|i| u32_at(p + 4 * (2 * n + i))).collect();
        p += 12 * n;
        out.push(Vector { w, desc, asc });
    }
    out
}

#[test]
fn permutations_match_torch() {
    let vs = vectors();
    assert_eq!(vs.len(), 228);
    let before = heap_fallback_count();
    for (j, v) in vs.iter().enumerate() {
        assert_eq!(
            argsort_desc(&v.w),
            v.desc,
            "vector {j} (n = {}) descending",
            v.w.len()
        );
        assert_eq!(
            argsort_asc(&v.w),
            v.asc,
            "vector {j} (n = {}) ascending",
            v.w.len()
        );
    }
    // the killer inputs reach libstdc++'s heap-sort fallback
    assert!(heap_fallback_count() > before);
}

#[test]
fn selections_match_torch() {
    for (j, v) in vectors().iter().enumerate() {
        let n = v.w.len();
        for k in [0, 1, n / 10, n / 3, n / 2, n.saturating_sub(1), n] {
            let mut want = vec![false; n];
            for &i in &v.desc[..k] {
                want[i as usize] = true;
            }
            assert_eq!(top_k_desc(&v.w, k), want, "vector {j} (n = {n}) top {k}");
        }
        for (lo, hi) in [
            (0, n / 2),
            (n / 4, 3 * n / 4),
            (n / 10, n),
            (n / 3, n / 3 + 1),
        ] {
            let mut want = vec![false; n];
            for &i in &v.asc[lo..hi.min(n)] {
                want[i as usize] = true;
            }
            assert_eq!(
                asc_range(&v.w, lo, hi),
                want,
                "vector {j} (n = {n}) [{lo}, {hi})"
            );
        }
    }
}

/// `torch.topk(w, k)` (largest) on 143 vectors (sizes 1 to 6,000, both of
/// its CPU kernel's paths: `std::partial_sort` where `k·64 ≤ n`, else
/// `std::nth_element`, including inputs that drive introselect into its
/// heap fallback), with the index sets torch 2.15 returned. Written by
/// /tmp/torchsort/gen_topk.py; format per vector: `b"TKV1", u32 n, u32
/// kind, u32 nk, f32 w[n]`, then per k: `u32 k, u32 m, u8 mask[⌈n/8⌉]
/// (bit i%8 of byte i/8: index i selected), u32 indices[m]`.
#[test]
fn topk_sets_match_torch() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/torch_topk_vectors.bin"
    ))
    .expect("tests/data/torch_topk_vectors.bin");
    let u32_at = |p: usize| u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap());
    let (mut p, mut vectors, mut checks, mut partial) = (0, 0, 0, 0);
    while p < bytes.len() {
        assert_eq!(&bytes[p..p + 4], b"TKV1");
        let (n, nk) = (u32_at(p + 4) as usize, u32_at(p + 12) as usize);
        p += 16;
        let w: Vec<f32> = (0..n).map(|i| f32::from_bits(u32_at(p + 4 * i))).collect();
        p += 4 * n;
        for _ in 0..nk {
            let (k, m) = (u32_at(p) as usize, u32_at(p + 4) as usize);
            p += 8;
            let want: Vec<bool> = (0..n)
                .map(|i| bytes[p + i / 8] >> (i % 8) & 1 == 1)
                .collect();
            p += n.div_ceil(8) + 4 * m;
            assert_eq!(
                topk_largest_mask(&w, k),
                want,
                "vector {vectors} (n = {n}) k = {k}"
            );
            checks += 1;
            partial += (k > 0 && k * 64 <= n) as usize;
        }
        vectors += 1;
    }
    assert_eq!(vectors, 143);
    assert!(
        checks > 1000 && partial > 50,
        "{checks} checks, {partial} on the partial-sort path"
    );
}
