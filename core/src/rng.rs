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
        self.uniform_at(index.wrapping_mul(Self::STEP))
    }

    /// The stream's key (what [`Stream::uniform_at`] mixes with the
    /// multiplied index), for vector versions of the draws.
    #[inline(always)]
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The multiplier applied to an element index before mixing: loops
    /// over consecutive indices add it instead of multiplying (see
    /// [`Stream::uniform_at`]).
    pub const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

    /// [`Stream::uniform`] of the index `i` given as `m = i · STEP`
    /// (wrapping): a loop keeps `m` and adds [`Stream::STEP`] per element
    /// (an add per lane instead of a 64-bit multiply).
    #[inline(always)]
    pub fn uniform_at(&self, m: u64) -> f32 {
        let h = mix64(self.key ^ m);
        (h >> 40) as f32 * (1.0 / 16_777_216.0)
    }

    /// A Bernoulli(p) draw for element `index`.
    #[inline(always)]
    pub fn bernoulli(&self, index: u64, p: f32) -> bool {
        self.uniform(index) < p
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
        let mut m = 1000u64.wrapping_mul(Stream::STEP);
        for i in 1000..1100u64 {
            assert_eq!(s.uniform_at(m).to_bits(), s.uniform(i).to_bits());
            m = m.wrapping_add(Stream::STEP);
        }
    }
}
