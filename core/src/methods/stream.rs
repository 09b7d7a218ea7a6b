//! Streaming execution of methods whose output depends on whole-tensor
//! statistics (top-k thresholds, L1 sums): the inputs are read in element
//! blocks, several times if needed — first to gather the statistics, last to
//! compute and emit the output — so memory stays O(block) whatever the tensor
//! size, and results are bit-identical to the whole-tensor kernels.
//!
//! Determinism: every statistic is either an integer count (order-free) or
//! an f64 sum of per-[`BLOCK`] partial sums (fixed order within a block,
//! blocks combined in order, as the whole-tensor kernels do), and blocks
//! are multiples of [`BLOCK`], so the thread count never changes a bit.

use rayon::prelude::*;

use super::*;

/// Where a streamed method reads its inputs from.
pub trait BlockSource: Sync {
    /// Elements `e0..e1` (flat index) of input `i` (configuration order),
    /// cast to the working dtype, into `out` (resized to `e1 - e0`).
    fn read(&self, i: usize, e0: usize, e1: usize, out: &mut Vec<f32>) -> Result<()>;

    /// When input `i` and the working dtype are both bfloat16: its task
    /// vector against `base` (elements `e0..e1`), `out[j] = bf16(x[j] -
    /// base[j])`, into `out`, returning true. Returns false, touching
    /// nothing, where the source has no such shortcut: the caller reads
    /// and subtracts itself (same bits).
    fn read_delta_bf16(
        &self,
        i: usize,
        e0: usize,
        e1: usize,
        base: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<bool> {
        let _ = (i, e0, e1, base, out);
        Ok(false)
    }
}

/// Receives output elements starting at flat index `e0` (any order).
pub type Emit<'a> = &'a (dyn Fn(usize, &[f32]) -> Result<()> + Sync);

/// One output tensor's streamed merge (all inputs have the output's shape).
pub struct StreamJob<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    /// The working dtype (of every input, as read).
    pub dtype: DType,
    pub n_inputs: usize,
    pub base: Option<usize>,
    pub global: &'a ParamValues,
    pub per_model: Vec<&'a ParamValues>,
    pub seed: u64,
    /// Target elements per block (rounded to the method's alignment).
    pub block: usize,
    /// Where given, emits output elements a second time, the later bytes
    /// winning: allowed once every element of the tensor has been emitted
    /// (see `gta_stream`'s speculative output). `None` where the output
    /// cannot be rewritten (an object-store upload).
    pub again: Option<Emit<'a>>,
}

impl StreamJob<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn model_param(&self, i: usize, k: &str) -> Option<f64> {
        self.per_model[i].get(k).copied()
    }
    pub fn flag(&self, k: &str) -> bool {
        self.global.get(k).is_some_and(|v| *v != 0.0)
    }
    pub fn global(&self, k: &str) -> f64 {
        self.global.get(k).copied().unwrap_or(f64::NAN)
    }
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::tensor(self.name, msg)
    }
}

/// Block boundaries: `n` elements in blocks of about `target` elements that
/// are multiples of `align` (itself a multiple of [`BLOCK`]).
pub fn block_size(target: usize, align: usize) -> usize {
    (target / align).max(1) * align
}

/// Least common multiple.
pub fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
}

/// Per-thread buffers of a block pass.
#[derive(Default)]
pub struct Scratch {
    pub bufs: Vec<Vec<f32>>,
    pub out: Vec<f32>,
    pub flags: Vec<u8>,
    pub flags2: Vec<u8>,
    pub rank: RankBufs,
}

/// Buffers of a ranking (DELLA).
#[derive(Default)]
pub struct RankBufs {
    pub keys32: Vec<u32>,
    pub counts: Vec<u32>,
    /// A second set of counts (odd elements), added into `counts`; all
    /// zeros between rows.
    pub counts2: Vec<u32>,
    pub keys: Vec<u64>,
    pub probs: Vec<f32>,
    pub bins: Vec<u32>,
    /// A probability per counting-sort bin.
    pub lut: Vec<f32>,
    /// The occupied bins.
    pub nz: Vec<u32>,
}

impl Scratch {
    /// Makes sure `k` input buffers exist.
    pub fn ensure(&mut self, k: usize) {
        while self.bufs.len() < k {
            self.bufs.push(Vec::new());
        }
    }
}

/// Runs `f(scratch, block index, e0, e1)` over every block in parallel;
/// results in block order.
pub fn for_blocks<T: Send>(
    n: usize,
    block: usize,
    f: impl Fn(&mut Scratch, usize, usize, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let all: Vec<usize> = (0..n.div_ceil(block)).collect();
    for_listed_blocks(n, block, &all, f)
}

/// [`for_blocks`] over the listed blocks only; results in list order.
pub fn for_listed_blocks<T: Send>(
    n: usize,
    block: usize,
    list: &[usize],
    f: impl Fn(&mut Scratch, usize, usize, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    list.par_iter()
        .with_max_len(1)
        .map(|&b| {
            with_scratch(|s| {
                let e0 = b * block;
                f(s, b, e0, (e0 + block).min(n))
            })
        })
        .collect()
}

/// Runs `f(scratch, block, e0, e1)` over the blocks of `order` (block
/// indices), claimed by the pool's threads strictly in list order — unlike
/// [`for_listed_blocks`], whose splitting starts a second thread in the
/// middle of the list — so that a block starts after every block before it
/// in the list has started. Results by block index (`None` for blocks not
/// listed).
pub fn for_blocks_claimed<T: Send>(
    n: usize,
    block: usize,
    order: &[usize],
    f: impl Fn(&mut Scratch, usize, usize, usize) -> Result<T> + Sync,
) -> Result<Vec<Option<T>>> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let nb = n.div_ceil(block);
    let results: Vec<Mutex<Option<T>>> = (0..nb).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let work = || {
        loop {
            let p = next.fetch_add(1, Ordering::SeqCst);
            let Some(&bi) = order.get(p) else {
                return;
            };
            let e0 = bi * block;
            match with_scratch(|s| f(s, bi, e0, (e0 + block).min(n))) {
                Ok(t) => *results[bi].lock().unwrap_or_else(|e| e.into_inner()) = Some(t),
                Err(e) => {
                    next.store(order.len(), Ordering::SeqCst);
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(e);
                    return;
                }
            }
        }
    };
    let workers = rayon::current_num_threads().clamp(1, order.len().max(1));
    rayon::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|_| work());
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(results
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect())
}

/// Runs every block like [`for_blocks`], in two steps: `pre(scratch, block,
/// e0, e1)` returns `k` counts of the block; then, once every earlier block
/// has published its counts, `post(scratch, block, e0, e1, before, own)`
/// gets the sums of the counts of all earlier blocks (`before`) and its own.
/// Blocks are claimed in order, and a block publishes before its `post`, so
/// a waiting block only waits on blocks that running workers hold. Saves a
/// whole pass when a block's work needs a running count (TIES's equal keys
/// at the threshold).
pub fn for_blocks_ordered(
    n: usize,
    block: usize,
    k: usize,
    pre: impl Fn(&mut Scratch, usize, usize, usize) -> Result<Vec<u64>> + Sync,
    post: impl Fn(&mut Scratch, usize, usize, usize, &[u64], &[u64]) -> Result<()> + Sync,
) -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};
    struct State {
        /// Blocks that have published.
        done: usize,
        /// Counts of blocks `0..done`.
        sums: Vec<u64>,
        failed: Option<Error>,
    }
    let nb = n.div_ceil(block);
    let next = AtomicUsize::new(0);
    let state = Mutex::new(State {
        done: 0,
        sums: vec![0; k],
        failed: None,
    });
    let cv = Condvar::new();
    let fail = |e: Error| {
        let mut g = state.lock().unwrap_or_else(|p| p.into_inner());
        g.failed.get_or_insert(e);
        cv.notify_all();
    };
    let work = || {
        loop {
            let bi = next.fetch_add(1, Ordering::SeqCst);
            if bi >= nb {
                return;
            }
            let (e0, e1) = (bi * block, ((bi + 1) * block).min(n));
            let r = with_scratch(|s| -> Result<bool> {
                let own = pre(s, bi, e0, e1);
                let mut g = state.lock().unwrap_or_else(|p| p.into_inner());
                while g.done < bi && g.failed.is_none() {
                    g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                if g.failed.is_some() {
                    return Ok(false);
                }
                let own = own?;
                let before = g.sums.clone();
                for (a, c) in g.sums.iter_mut().zip(&own) {
                    *a += c;
                }
                g.done = bi + 1;
                drop(g);
                cv.notify_all();
                post(s, bi, e0, e1, &before, &own)?;
                Ok(true)
            });
            match r {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => return fail(e),
            }
        }
    };
    let workers = rayon::current_num_threads().clamp(1, nb.max(1));
    rayon::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|_| work());
        }
    });
    match state.into_inner().unwrap_or_else(|p| p.into_inner()).failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's [`Scratch`] (kept between blocks and passes,
/// so buffers are neither reallocated nor zeroed per block; a fresh one if
/// a nested call has it).
pub fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    let mut s = SCRATCH.with(|c| c.borrow_mut().take()).unwrap_or_default();
    let r = f(&mut s);
    SCRATCH.with(|c| *c.borrow_mut() = Some(s));
    r
}

/// Combines per-block partial sums in block order (as the whole-tensor kernels do).
pub fn total(parts: impl IntoIterator<Item = f64>) -> f64 {
    parts.into_iter().sum()
}

/// A streamed `select_largest` ([`super::sparsify::select_largest`]): the
/// `k` largest keys of `n`, boundary ties taken in index order from one end.
#[derive(Debug, Clone)]
pub struct Selection {
    pub n: usize,
    pub k: usize,
    pub low_first: bool,
    /// Keys strictly above `thr` are selected.
    pub thr: u32,
    /// How many keys equal to `thr` are selected.
    pub ties: u64,
    /// How many keys equal `thr` in the whole tensor.
    pub eq_total: u64,
    /// Per block: keys equal to `thr` in earlier blocks (when needed), and
    /// the total last.
    pub eq_before: Vec<u64>,
}

impl Selection {
    pub fn all(&self) -> bool {
        self.k >= self.n
    }
    pub fn none(&self) -> bool {
        self.k == 0
    }
    /// Whether per-block counts of boundary keys are needed.
    pub fn needs_counts(&self) -> bool {
        !self.all() && !self.none() && self.ties != 0 && self.ties != self.eq_total
    }
    /// Marks the selected elements of block `b` (keys in `keys`, `sel` out).
    pub fn mark(&self, b: usize, keys: impl Fn(usize) -> u32, len: usize, sel: &mut Vec<u8>) {
        sel.clear();
        if self.all() {
            sel.resize(len, 1);
            return;
        }
        if self.none() {
            sel.resize(len, 0);
            return;
        }
        let thr = self.thr;
        sel.extend((0..len).map(|i| (keys(i) > thr) as u8));
        if self.ties == 0 {
            return;
        }
        if self.ties == self.eq_total {
            for (i, s) in sel.iter_mut().enumerate() {
                if keys(i) == thr {
                    *s = 1;
                }
            }
            return;
        }
        // global position among the equal keys decides
        let mut pos = self.eq_before[b];
        let (take_from, take_to) = self.take_range();
        for (i, s) in sel.iter_mut().enumerate() {
            if keys(i) == thr {
                if pos >= take_from && pos < take_to {
                    *s = 1;
                }
                pos += 1;
            }
        }
    }

    /// Which of the keys equal to `thr` (by position among them, in index
    /// order) are selected.
    fn take_range(&self) -> (u64, u64) {
        if self.low_first {
            (0, self.ties)
        } else {
            (self.eq_total - self.ties, self.eq_total)
        }
    }

    /// Zeroes (+0.0) the elements of block `b` that are not selected, keys
    /// being [`crate::simd::key`]`(x, flip)`: what [`Selection::mark`] and
    /// a multiply by its flags give, vectorised.
    pub fn apply(&self, b: usize, d: &mut [f32], flip: u32) {
        self.apply_with(|| (self.eq_before[b], self.eq_before[b + 1]), d, flip)
    }

    /// [`Selection::apply`] with the block's `(keys equal to thr before it,
    /// and up to its end)` given by `eq` (asked only when needed).
    pub fn apply_with(&self, eq: impl FnOnce() -> (u64, u64), d: &mut [f32], flip: u32) {
        use crate::simd::{keep_above, key};
        if self.all() {
            return;
        }
        if self.none() {
            d.fill(0.0);
            return;
        }
        let thr = self.thr;
        if self.ties == 0 {
            return keep_above(d, flip, thr, false);
        }
        if self.ties == self.eq_total {
            return keep_above(d, flip, thr, true);
        }
        let (from, to) = self.take_range();
        let (p0, p1) = eq();
        if p1 <= from || p0 >= to {
            return keep_above(d, flip, thr, false);
        }
        if p0 >= from && p1 <= to {
            return keep_above(d, flip, thr, true);
        }
        // the block where the selection ends among the equal keys
        let mut pos = p0;
        for x in d.iter_mut() {
            let k = key(*x, flip);
            if k > thr {
                continue;
            }
            if k == thr {
                let keep = pos >= from && pos < to;
                pos += 1;
                if keep {
                    continue;
                }
            }
            *x = 0.0;
        }
    }
}

/// 16-bit histograms of keys (high half, or the low half of keys whose high
/// half is `hi`), plus the OR and AND of low halves seen.
#[derive(Clone)]
pub struct Hist {
    pub h: Vec<u64>,
    pub lo_or: u32,
    pub lo_and: u32,
}

impl Hist {
    pub fn new() -> Hist {
        Hist {
            h: vec![0; 1 << 16],
            lo_or: 0,
            lo_and: 0xFFFF,
        }
    }
    pub fn add(&mut self, o: &Hist) {
        for (a, b) in self.h.iter_mut().zip(&o.h) {
            *a += b;
        }
        self.lo_or |= o.lo_or;
        self.lo_and &= o.lo_and;
    }
}

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

/// First level of the radix select: from the histogram of high halves,
/// (hi bin, count above it).
pub fn pick_bin(h: &[u64], k: u64) -> (usize, u64) {
    let mut cum = 0u64;
    for b in (0..h.len()).rev() {
        if cum + h[b] >= k {
            return (b, cum);
        }
        cum += h[b];
    }
    (0, cum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Every block sees the sum of the counts of the blocks before it,
    /// whatever order the workers finish in; an error in any step comes
    /// back (and nothing hangs).
    #[test]
    fn ordered_blocks_see_their_prefix_and_fail_cleanly() {
        let n = 1000;
        let got = Mutex::new(vec![(0u64, 0u64); 100]);
        for_blocks_ordered(
            n,
            10,
            1,
            |_, bi, _, _| {
                // uneven work so workers overtake each other
                std::thread::sleep(std::time::Duration::from_micros((bi as u64 * 37) % 300));
                Ok(vec![bi as u64 % 7])
            },
            |_, bi, _, _, before, own| {
                got.lock().unwrap()[bi] = (before[0], own[0]);
                Ok(())
            },
        )
        .unwrap();
        let got = got.into_inner().unwrap();
        let mut acc = 0;
        for (bi, (before, own)) in got.iter().enumerate() {
            assert_eq!((*before, *own), (acc, bi as u64 % 7), "block {bi}");
            acc += own;
        }
        for fail_pre in [true, false] {
            let r = for_blocks_ordered(
                n,
                10,
                1,
                |_, bi, _, _| {
                    if fail_pre && bi == 37 {
                        return Err(Error::tensor("t", "read failed"));
                    }
                    Ok(vec![1])
                },
                |_, bi, _, _, _, _| {
                    if !fail_pre && bi == 50 {
                        return Err(Error::tensor("t", "write failed"));
                    }
                    Ok(())
                },
            );
            let e = r.expect_err("an error").to_string();
            let want = if fail_pre {
                "read failed"
            } else {
                "write failed"
            };
            assert!(e.contains(want), "{e}");
        }
    }
}
