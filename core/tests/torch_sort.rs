//! `smelt_core::torch_sort` against torch itself: 228 vectors (sizes 1 to
//! 8,000; few-level integers, bfloat16 task-vector magnitudes with many
//! exact zeros, ±0, NaN, sorted / reversed / all-equal, and McIlroy
//! "killer" inputs that drive introsort into its heap-sort fallback) with
//! the permutations torch 2.15 (CPU) returned for
//! `torch.argsort(w, descending=True)` and `torch.sort(w).indices`.
//! Written by /tmp/torchsort/gen.py (session 13); format per vector:
//! `b"TSV1", u32 n, u32 kind, f32 w[n], u32 desc[n], u32 asc[n]`.

use smelt_core::torch_sort::{
    argsort_asc, argsort_desc, asc_range, heap_fallback_count, top_k_desc,
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
