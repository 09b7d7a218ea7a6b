//! Sparsification of task vectors (spec §4.7): magnitude top-k (TIES),
//! random Bernoulli (DARE), magnitude with outliers (breadcrumbs) and DELLA's
//! rank-weighted Bernoulli; optional L1 rescaling.
//!
//! Ties in magnitude are broken deterministically: the lower flat index ranks
//! first among equal magnitudes. Random draws come from [`crate::rng::Stream`].

use rayon::prelude::*;

use super::*;
use crate::rng::Stream;

/// `m = Δ·mask`; with `rescale`, scaled so that `Σ|m| = Σ|Δ|` (skipped when
/// either sum is below 1e-7).
pub fn masked(
    delta: &[f32],
    keep: impl Fn(usize) -> bool + Sync + Send,
    rescale: bool,
    dt: DType,
) -> Vec<f32> {
    let m: Vec<f32> = delta
        .par_iter()
        .enumerate()
        .with_min_len(4096)
        .map(|(i, d)| if keep(i) { *d } else { 0.0 })
        .collect();
    if !rescale {
        return m;
    }
    let before = dt.round(sum_abs(delta) as f32);
    let after = dt.round(sum_abs(&m) as f32);
    if before < 1e-7 || after < 1e-7 {
        return m;
    }
    let ratio = dt.round(before / after);
    crate::with_rounding!(dt, |rr| m
        .par_iter()
        .with_min_len(4096)
        .map(|x| rr.r(x * ratio))
        .collect())
}

/// Order-preserving key of |x| (larger magnitude → larger key; NaN largest).
#[inline(always)]
pub fn abs_key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

const HIST_CHUNK: usize = 1 << 20;

fn histogram(n: usize, bin: impl Fn(usize) -> Option<usize> + Sync) -> Vec<u64> {
    (0..n.div_ceil(HIST_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut h = vec![0u64; 1 << 16];
            for i in c * HIST_CHUNK..((c + 1) * HIST_CHUNK).min(n) {
                if let Some(b) = bin(i) {
                    h[b] += 1;
                }
            }
            h
        })
        .reduce(
            || vec![0u64; 1 << 16],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        )
}

/// Selects the `k` elements with the largest keys (radix select: two
/// 16-bit histogram passes, exact and deterministic). Among equal keys at
/// the boundary, lower indices are taken first when `ties_low_first`, else
/// higher indices.
pub fn select_largest(
    n: usize,
    k: usize,
    key: impl Fn(usize) -> u32 + Sync,
    ties_low_first: bool,
) -> Vec<bool> {
    if k == 0 {
        return vec![false; n];
    }
    if k >= n {
        return vec![true; n];
    }
    let h1 = histogram(n, |i| Some((key(i) >> 16) as usize));
    let (mut cum, mut hi) = (0u64, 0usize);
    for b in (0..1 << 16).rev() {
        if cum + h1[b] >= k as u64 {
            hi = b;
            break;
        }
        cum += h1[b];
    }
    let need = k as u64 - cum;
    let h2 = histogram(n, |i| {
        let kk = key(i);
        ((kk >> 16) as usize == hi).then_some((kk & 0xFFFF) as usize)
    });
    let (mut cum2, mut lo) = (0u64, 0usize);
    for b in (0..1 << 16).rev() {
        if cum2 + h2[b] >= need {
            lo = b;
            break;
        }
        cum2 += h2[b];
    }
    let thr = ((hi as u32) << 16) | lo as u32;
    let ties = (need - cum2) as usize;
    let mut mask: Vec<bool> = vec![false; n];
    mask.par_chunks_mut(BLOCK).enumerate().for_each(|(b, m)| {
        for (j, o) in m.iter_mut().enumerate() {
            *o = key(b * BLOCK + j) > thr;
        }
    });
    // boundary ties, in index order from the chosen end
    let mut left = ties;
    let order: Box<dyn Iterator<Item = usize>> = if ties_low_first {
        Box::new(0..n)
    } else {
        Box::new((0..n).rev())
    };
    for i in order {
        if left == 0 {
            break;
        }
        if key(i) == thr {
            mask[i] = true;
            left -= 1;
        }
    }
    mask
}

/// The `k` largest magnitudes (ties: lower flat index first) as a mask.
pub fn top_k_mask(delta: &[f32], k: usize) -> Vec<bool> {
    select_largest(delta.len(), k, |i| abs_key(delta[i]), true)
}

/// How many elements TIES magnitude pruning keeps of `n` at `density` < 1:
/// `max(1, floor(density·n))` — at least one of a non-empty tensor — and
/// none at `density` ≤ 0 (mergekit 0.1.5's `magnitude`).
pub fn magnitude_k(n: usize, density: f64) -> usize {
    if density <= 0.0 || n == 0 {
        0
    } else {
        ((density * n as f64) as usize).max(1)
    }
}

/// TIES magnitude pruning: keep the [`magnitude_k`] largest magnitudes.
/// Tensors with fewer elements than this pick equal magnitudes at a top-k
/// cut in torch's order ([`crate::torch_sort`], a replica of the
/// introsort torch's CPU `argsort` runs), so that small tensors (norms,
/// biases, small models) get mergekit's bytes even in bfloat16, where
/// equal magnitudes are common. Larger tensors keep the lower flat index
/// (O(n) histogram selection, streamed: the replica needs an 8-byte copy
/// of the tensor). The limit equals the size from which tensors are
/// streamed, so both paths agree whatever the tensor's route.
pub const TORCH_TIE_ORDER_BELOW: usize = 4 * BLOCK;

/// `|x|` of every element, as torch's `tensor.abs().float()`.
fn magnitudes(delta: &[f32]) -> Vec<f32> {
    delta.iter().map(|x| x.abs()).collect()
}

pub fn magnitude(delta: &[f32], density: f64, rescale: bool, dt: DType) -> Vec<f32> {
    if density >= 1.0 {
        return delta.to_vec();
    }
    let k = magnitude_k(delta.len(), density);
    let mask = if delta.len() < TORCH_TIE_ORDER_BELOW {
        // torch.argsort(|Δ|, descending=True)[:k]
        crate::torch_sort::top_k_desc(&magnitudes(delta), k)
    } else {
        top_k_mask(delta, k)
    };
    masked(delta, |i| mask[i], rescale, dt)
}

/// DARE: keep each element with probability `density`.
pub fn bernoulli(
    delta: &[f32],
    density: f64,
    rescale: bool,
    dt: DType,
    stream: Stream,
) -> Vec<f32> {
    if density >= 1.0 {
        return delta.to_vec();
    }
    let p = density as f32;
    // float16 is masked and rescaled in f32, then cast back once (mergekit on CPU)
    let wdt = if dt == DType::F16 { DType::F32 } else { dt };
    let m = masked(delta, |i| stream.bernoulli(i as u64, p), rescale, wdt);
    if wdt != dt {
        m.into_iter().map(|x| dt.round(x)).collect()
    } else {
        m
    }
}

/// Breadcrumbs: drop the smallest and the `gamma` fraction of largest
/// magnitudes, keeping `floor(density·n)` (mergekit 0.1.5 keeps the sorted
/// range `[bot, bot + keep)`: with no outliers to drop, the largest `keep`).
pub fn magnitude_outliers(
    delta: &[f32],
    density: f64,
    gamma: f64,
    rescale: bool,
    dt: DType,
) -> Vec<f32> {
    if density >= 1.0 {
        return delta.to_vec();
    }
    let n = delta.len() as i64;
    let keep = (n as f64 * density) as i64;
    let mut top = (n as f64 * gamma) as i64;
    let mut bot = n - keep - top;
    if bot < 0 {
        top += bot;
        bot = 0;
    }
    // ascending stable order: the bottom `bot` (ties: lower index first) and
    // the top `top` (ties: higher index first) are dropped
    let n = n as usize;
    if n < TORCH_TIE_ORDER_BELOW {
        // torch.sort(|Δ|).indices[bot : bot + keep]
        let hi = (bot + keep).max(bot) as usize;
        let mask = crate::torch_sort::asc_range(&magnitudes(delta), bot as usize, hi);
        return masked(delta, |i| mask[i], rescale, dt);
    }
    let low = select_largest(n, bot as usize, |i| !abs_key(delta[i]), true);
    let high = select_largest(n, top as usize, |i| abs_key(delta[i]), false);
    let mask: Vec<bool> = low.iter().zip(&high).map(|(l, h)| !l && !h).collect();
    masked(delta, |i| mask[i], rescale, dt)
}

/// DELLA's keep probabilities by rank in a row of `len`, summed, with the
/// reciprocals of the tie counts (see [`RankProbs::tie_mean`]).
#[derive(Clone, Debug, Default)]
pub struct RankProbs {
    /// `cum[r]`: the f64 sum of the probabilities of ranks `0..r` (0-based,
    /// ascending |Δ|), each computed as mergekit does in the work dtype
    /// (`argsort(...).to(wdt) + 1`, then `(rank − 1) / (L − 1)`, rounded at
    /// every step). Exact while `len < 2¹⁹` and `density − ε ≥ 2⁻¹⁰`
    /// (every probability is a multiple of 2⁻³⁴).
    pub cum: Vec<f64>,
    /// `inv[c] = 1 / c` (f64; `inv[0]` unused).
    pub inv: Vec<f64>,
}

impl RankProbs {
    pub fn new(len: usize, density: f64, epsilon: f64, wdt: DType) -> RankProbs {
        let lo = (density - epsilon) as f32;
        let span = (2.0 * epsilon) as f32;
        let denom = wdt.round((len as f32 - 1.0).max(0.0));
        let mut cum = Vec::with_capacity(len + 1);
        let mut acc = 0f64;
        cum.push(acc);
        for rank0 in 0..len {
            let rank = wdt.round(wdt.round(rank0 as f32) + 1.0);
            let nr = wdt.round(wdt.round(rank - 1.0) / denom).clamp(0.0, 1.0);
            acc += wdt.round(wdt.round(nr * span) + lo) as f64;
            cum.push(acc);
        }
        let inv = (0..=len).map(|c| 1.0 / c as f64).collect();
        RankProbs { cum, inv }
    }

    /// The keep probability of each of `count` (≥ 1) equal magnitudes
    /// whose ranks start at `lo`: the mean of those ranks' probabilities,
    /// `(cum[lo + count] − cum[lo]) · (1 / count)` in f64, rounded to f32.
    /// mergekit orders ties arbitrarily, so a tied element's probability is
    /// one of these ranks' at random: the mean is its chance of being kept.
    /// A magnitude that occurs once gets its rank's probability exactly.
    #[inline(always)]
    pub fn tie_mean(&self, lo: usize, count: usize) -> f32 {
        ((self.cum[lo + count] - self.cum[lo]) * self.inv[count]) as f32
    }

    /// Calls `put(index, probability)` for every key of `keys` — sorted
    /// `(|Δ| key << 32) | index` — whose ranks start at `from`: equal keys
    /// share their ranks' [`RankProbs::tie_mean`].
    #[inline(always)]
    pub fn for_sorted(&self, keys: &[u64], from: usize, mut put: impl FnMut(usize, f32)) {
        let mut g = 0;
        while g < keys.len() {
            let k = keys[g] >> 32;
            let e = g + keys[g..].iter().take_while(|x| *x >> 32 == k).count();
            let q = self.tie_mean(from + g, e - g);
            for x in &keys[g..e] {
                put((*x & 0xFFFF_FFFF) as usize, q);
            }
            g = e;
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// DELLA: per row (axis 1), keep probability rises linearly with the rank of
/// |Δ| from `density − ε` to `density + ε`; equal magnitudes share the mean
/// probability of their ranks ([`RankProbs::tie_mean`]).
pub fn della_magprune(
    delta: &[f32],
    shape: &[usize],
    density: f64,
    epsilon: f64,
    rescale: bool,
    dt: DType,
    stream: Stream,
    name: &str,
) -> Result<Vec<f32>> {
    if density >= 1.0 {
        return Ok(delta.to_vec());
    }
    if density <= 0.0 {
        return Ok(vec![0.0; delta.len()]);
    }
    if !(density - epsilon > 0.0 && density + epsilon < 1.0) {
        return Err(Error::tensor(
            name,
            format!(
                "della: epsilon {epsilon} must be chosen such that density ± epsilon is in (0, 1) (density {density})"
            ),
        ));
    }
    // work dtype: f16 is ranked in f32 on CPU
    let wdt = if dt == DType::F16 { DType::F32 } else { dt };
    // (len, inner): ranks run along the middle axis, per outer index
    let (len, inner) = if shape.len() < 2 {
        (delta.len(), 1)
    } else {
        (shape[1], shape[2..].iter().product::<usize>())
    };
    let rp = RankProbs::new(len, density, epsilon, wdt);
    let mut p = vec![0.0f32; delta.len()];
    p.par_chunks_mut(len * inner)
        .enumerate()
        .for_each(|(o, chunk)| {
            let base = o * len * inner;
            // keys sort by |Δ| (the index only makes the order total)
            let mut keys: Vec<u64> = Vec::with_capacity(len);
            for c in 0..inner {
                keys.clear();
                keys.extend(
                    (0..len)
                        .map(|j| ((abs_key(delta[base + j * inner + c]) as u64) << 32) | j as u64),
                );
                keys.sort_unstable();
                // equal magnitudes share their ranks' mean probability
                rp.for_sorted(&keys, 0, |j, q| chunk[j * inner + c] = q);
            }
        });
    let m = masked(delta, |i| stream.bernoulli(i as u64, p[i]), rescale, wdt);
    Ok(if wdt != dt {
        m.into_iter().map(|x| dt.round(x)).collect()
    } else {
        m
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 100.0)
            .collect()
    }

    #[test]
    fn magnitude_keeps_exact_count_and_largest() {
        let d = data(8192);
        let out = magnitude(&d, 0.5, false, DType::F32);
        assert_eq!(out.iter().filter(|x| **x != 0.0).count(), 4096);
        assert_eq!(magnitude(&d, 1.0, false, DType::F32), d);
        // mergekit 0.1.5: nothing at density ≤ 0, at least one element else
        assert!(
            magnitude(&d, 0.0, false, DType::F32)
                .iter()
                .all(|x| *x == 0.0)
        );
        assert!(
            magnitude(&d, -0.5, false, DType::F32)
                .iter()
                .all(|x| *x == 0.0)
        );
        let one = magnitude(&d[..64], 0.01, false, DType::F32);
        let kept: Vec<usize> = (0..64).filter(|i| one[*i] != 0.0).collect();
        let top = (0..64).max_by(|a, b| d[*a].abs().total_cmp(&d[*b].abs()).then(b.cmp(a)));
        assert_eq!(kept, vec![top.unwrap()]);
        assert_eq!(
            (
                magnitude_k(64, 0.01),
                magnitude_k(64, 0.0),
                magnitude_k(0, 0.5)
            ),
            (1, 0, 0)
        );
        let min_kept = out
            .iter()
            .filter(|x| **x != 0.0)
            .map(|x| x.abs())
            .fold(f32::MAX, f32::min);
        let max_dropped = d
            .iter()
            .zip(&out)
            .filter(|(_, o)| **o == 0.0)
            .map(|(x, _)| x.abs())
            .fold(0.0, f32::max);
        assert!(min_kept >= max_dropped);
    }

    #[test]
    fn outliers_keep_count_and_small_tensors() {
        let d = data(8192);
        for density in [0.1, 0.3, 0.5, 0.9] {
            let out = magnitude_outliers(&d, density, 0.1 * (1.0 - density), false, DType::F32);
            let nz = out.iter().filter(|x| **x != 0.0).count();
            // a few deltas are exactly zero in this data
            assert!(
                (nz as i64 - (8192.0 * density) as i64).abs() <= 10,
                "{density}: {nz}"
            );
        }
        // floor(0.01·50) = 0 outliers: mergekit 0.1.5 keeps the 25 largest
        // (the spec's reading, an empty slice, zeroed them all)
        let small = data(50);
        let out = magnitude_outliers(&small, 0.5, 0.01, false, DType::F32);
        assert_eq!(out, magnitude(&small, 0.5, false, DType::F32));
        assert_eq!(out.iter().filter(|x| **x != 0.0).count(), 25);
    }

    #[test]
    fn bernoulli_rescale_preserves_l1() {
        let d = data(100_000);
        let s = Stream::new(1, "t", "x");
        let out = bernoulli(&d, 0.3, true, DType::F32, s);
        let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
        assert!((l1(&out) / l1(&d) - 1.0).abs() < 1e-4);
        let kept = out.iter().filter(|x| **x != 0.0).count() as f64 / d.len() as f64;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
    }

    proptest::proptest! {
        /// Radix select equals a stable sort (ties broken by index) on data
        /// with many equal keys.
        #[test]
        fn select_largest_matches_sort(keys in proptest::collection::vec(0u32..40, 1..3000), kf in 0.0f64..1.0, low in proptest::bool::ANY) {
            let n = keys.len();
            let k = (kf * n as f64) as usize;
            let got = select_largest(n, k, |i| keys[i] * 65_537, low);
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|a, b| keys[*b].cmp(&keys[*a]).then(if low { a.cmp(b) } else { b.cmp(a) }));
            let mut want = vec![false; n];
            for i in &idx[..k] { want[*i] = true; }
            proptest::prop_assert_eq!(got, want);
        }
    }

    /// DELLA keeps each magnitude with the mean probability of the ranks it
    /// occupies: rows of 41 values in equal numbers, so |x| = k/100 (k ≥ 1,
    /// two values each) occupies ranks (2k − 1)/41 … (2k + 1)/41 of every
    /// row and is kept at about `d − ε + 2ε·2k/41`.
    #[test]
    fn della_keeps_tied_magnitudes_at_their_ranks_mean() {
        let (rows, len) = (64, 1050);
        let d: Vec<f32> = (0..rows * len)
            .map(|i| ((i * 7919 + i / len) % 41) as f32 * 0.01 - 0.2)
            .map(crate::dtype::bf16_round)
            .collect();
        let s = Stream::new(9, "t", "della");
        let (dens, eps) = (0.5, 0.2);
        let out = della_magprune(&d, &[rows, len], dens, eps, false, DType::BF16, s, "t").unwrap();
        let class = |x: f32| (x.abs() * 100.0).round() as usize;
        let (mut kept, mut seen) = ([0usize; 21], [0usize; 21]);
        for (x, o) in d.iter().zip(&out) {
            if *x != 0.0 {
                seen[class(*x)] += 1;
                kept[class(*x)] += (*o != 0.0) as usize;
            }
        }
        for k in 1..21 {
            let want = dens - eps + 2.0 * eps * (2 * k) as f64 / 41.0;
            let got = kept[k] as f64 / seen[k] as f64;
            assert!(
                (got - want).abs() < 0.03,
                "magnitude class {k}: kept {got}, want {want}"
            );
        }
    }

    #[test]
    fn della_validates_epsilon() {
        let d = data(64);
        let s = Stream::new(1, "t", "x");
        assert!(della_magprune(&d, &[8, 8], 0.5, 0.6, true, DType::F32, s, "t").is_err());
        let out = della_magprune(&d, &[8, 8], 0.5, 0.05, true, DType::F32, s, "t").unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
