//! Counter-based random numbers: every draw is a pure function of
//! (seed, stream key, element index), so random methods (DARE, DELLA, Arcee
//! Fusion's subsample) give the same bytes whatever the thread count, the
//! processing order, or how a cluster splits the work.

/// SplitMix64 finaliser: a bijective 64-bit mixer.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 32-bit integer mixer (the constants of Chris Wellons' "lowbias32"),
/// cheap on 16 vector lanes: the hash of DARE's and DELLA's mask draws.
#[inline(always)]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x21f0_aaad);
    x ^= x >> 15;
    x = x.wrapping_mul(0x735a_2d97);
    x ^ (x >> 15)
}

/// A mask draw from its 32-bit run key and multiplied index `m` (see
/// [`Stream::draw`]): uniform in [0, 1) with 24 bits of resolution.
#[inline(always)]
pub fn draw_at(k32: u32, m: u32) -> f32 {
    (mix32(k32 ^ m) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Calls `f(offset, k32, m)` for each run of `n` element indices from
/// `e0` that share their high 32 bits: `offset` into the range, the run's
/// key ([`Stream::draw_key`]) and the multiplied low index of its first
/// element; the run's draws are `draw_at(k32, m + j·STEP32)`.
#[inline(always)]
pub fn draw_runs(s: Stream, e0: u64, n: usize, mut f: impl FnMut(usize, usize, u32, u32)) {
    let mut j = 0usize;
    while j < n {
        let i = e0 + j as u64;
        let run = ((1u64 << 32) - (i & 0xFFFF_FFFF)).min((n - j) as u64) as usize;
        f(
            j,
            run,
            s.draw_key((i >> 32) as u32),
            (i as u32).wrapping_mul(Stream::STEP32),
        );
        j += run;
    }
}

/// FNV-1a hash of a string (stable across platforms and releases).
pub fn hash_str(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A stream of uniform draws identified by (seed, key).
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    key: u64,
}

impl Stream {
    /// `purpose` distinguishes streams of one tensor (e.g. `"dare:2"` for the
    /// mask of the third model).
    pub fn new(seed: u64, tensor: &str, purpose: &str) -> Stream {
        Stream {
            key: mix64(
                mix64(seed ^ 0x5EED_5EED_5EED_5EED) ^ hash_str(tensor) ^ mix64(hash_str(purpose)),
            ),
        }
    }

    /// Uniform in [0, 1) with 24 bits of resolution (exact in f32).
    #[inline(always)]
    pub fn uniform(&self, index: u64) -> f32 {
        let h = mix64(self.key ^ index.wrapping_mul(Self::STEP));
        (h >> 40) as f32 * (1.0 / 16_777_216.0)
    }

    /// The odd multiplier of an element index before the 64-bit mix.
    pub const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

    /// The odd multiplier of an element's low 32 index bits in a mask
    /// draw (loops add it per element).
    pub const STEP32: u32 = 0x9E37_79B9;

    /// The 32-bit key of the mask draws of element indices `hi·2³²..`.
    #[inline(always)]
    pub fn draw_key(&self, hi: u32) -> u32 {
        (mix64(self.key ^ (hi as u64).wrapping_mul(Self::STEP)) >> 32) as u32
    }

    /// The mask draw of element `index` (DARE, DELLA): uniform in [0, 1)
    /// with 24 bits, from a 32-bit hash of the multiplied low index bits
    /// and a key per 2³² indices — a vector lane per element, about three
    /// times cheaper than [`Stream::uniform`]'s 64-bit SplitMix.
    #[inline(always)]
    pub fn draw(&self, index: u64) -> f32 {
        draw_at(
            self.draw_key((index >> 32) as u32),
            (index as u32).wrapping_mul(Self::STEP32),
        )
    }

    /// A Bernoulli(p) mask draw for element `index` ([`Stream::draw`]).
    #[inline(always)]
    pub fn bernoulli(&self, index: u64, p: f32) -> bool {
        self.draw(index) < p
    }

    /// Raw 64 random bits for element `index`.
    #[inline(always)]
    pub fn bits(&self, index: u64) -> u64 {
        mix64(self.key ^ index.wrapping_mul(Self::STEP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_roughly_uniform() {
        let s = Stream::new(7, "model.layers.0.mlp.up_proj.weight", "dare:0");
        let s2 = Stream::new(7, "model.layers.0.mlp.up_proj.weight", "dare:0");
        let s3 = Stream::new(8, "model.layers.0.mlp.up_proj.weight", "dare:0");
        assert_eq!(s.uniform(123), s2.uniform(123));
        assert_ne!(s.uniform(123), s3.uniform(123));
        let n = 100_000;
        let kept = (0..n).filter(|i| s.bernoulli(*i, 0.3)).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
    }

    /// Mask draws: Bernoulli frequencies right, streams of one tensor
    /// uncorrelated, runs split where the high index bits change, and the
    /// stepped form equal to the direct one.
    #[test]
    fn mask_draws() {
        let a = Stream::new(7, "t", "dare:0");
        let b = Stream::new(7, "t", "dare:1");
        let n = 1u64 << 20;
        for p in [0.1f32, 0.5, 0.9] {
            let kept = (0..n).filter(|i| a.bernoulli(*i, p)).count() as f64 / n as f64;
            assert!((kept - p as f64).abs() < 0.003, "{p}: {kept}");
        }
        // two models' masks of one tensor: P(both kept) = p², for a
        // power-of-two range too (a plain xor of keys would pair indices up)
        let both = (0..n)
            .filter(|i| a.bernoulli(*i, 0.5) && b.bernoulli(*i, 0.5))
            .count() as f64
            / n as f64;
        assert!((both - 0.25).abs() < 0.003, "{both}");
        // neighbours uncorrelated
        let pairs = (0..n)
            .filter(|i| a.bernoulli(*i, 0.5) && a.bernoulli(*i + 1, 0.5))
            .count() as f64
            / n as f64;
        assert!((pairs - 0.25).abs() < 0.003, "{pairs}");
        // runs across 2³²
        let e0 = (1u64 << 32) - 5;
        let mut seen = Vec::new();
        draw_runs(a, e0, 12, |off, run, k32, mut m| {
            for j in 0..run {
                seen.push((off + j, draw_at(k32, m)));
                m = m.wrapping_add(Stream::STEP32);
            }
        });
        assert_eq!(seen.len(), 12);
        for (j, u) in seen {
            assert_eq!(u.to_bits(), a.draw(e0 + j as u64).to_bits(), "{j}");
        }
        assert_ne!(a.draw_key(0), a.draw_key(1));
    }
}
