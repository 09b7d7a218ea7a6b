//! Streamed execution of the task-arithmetic family (see [`super::stream`]):
//! the same numbers as [`GeneralizedTaskArithmetic::merge`], in O(block)
//! memory. Passes over the inputs, each only when needed:
//! 1. radix-select histograms of |Δ| (TIES, breadcrumbs), a second level
//!    when keys differ below their high 16 bits (not for bfloat16);
//! 2. per-block counts of boundary keys, when only some of the equal keys at
//!    the threshold are kept;
//! 3. L1 sums of Δ and of the masked Δ per [`BLOCK`] (rescaling);
//! 4. the output — for rescaled DARE / DELLA, most blocks' output already
//!    in pass 3, with predicted ratios (see [`speculates`]).

use super::generalized_task_arithmetic::{
    CombineScratch, GeneralizedTaskArithmetic, Sparsify, combine_chunk,
};
use super::sparsify::{self, abs_key};
use super::stream::*;
use super::*;
use crate::rng::Stream;
use std::sync::Mutex;

/// Largest block alignment (elements) DELLA's row ranking may need before a
/// tensor is merged whole instead.
const MAX_ALIGN: usize = 4 << 20;

/// Elements combined at a time (buffers stay in L1/L2).
const SUB: usize = 4096;

/// How one model's task vector is sparsified.
enum Sp {
    /// Δ unchanged.
    Keep,
    /// All zeros.
    Zero,
    /// Selection `sel` keeps.
    Top(usize),
    /// Neither selection `low` nor `high` keeps.
    Outliers(usize, usize),
    /// Bernoulli(p).
    Random(f32),
    /// DELLA: rank-dependent Bernoulli.
    Della,
}

/// Which key a selection ranks by.
#[derive(Clone, Copy)]
enum KeyKind {
    Abs,
    NotAbs,
}

impl KeyKind {
    #[inline(always)]
    fn key(self, x: f32) -> u32 {
        match self {
            KeyKind::Abs => abs_key(x),
            KeyKind::NotAbs => !abs_key(x),
        }
    }
    /// The `flip` of [`crate::simd::key`].
    fn flip(self) -> u32 {
        match self {
            KeyKind::Abs => 0,
            KeyKind::NotAbs => u32::MAX,
        }
    }
}

struct Model {
    input: usize,
    w: f32,
    sp: Sp,
    stream: Stream,
    /// dtype of the mask/rescale arithmetic (f32 for f16 random methods).
    mdt: DType,
    rescale: bool,
    density: f64,
    epsilon: f64,
}

struct Sel {
    model: usize,
    kind: KeyKind,
    s: Selection,
}

/// DELLA's ranking geometry: ranks along axis 1 per (outer, inner) index.
struct DellaGeom {
    len: usize,
    inner: usize,
    /// Keep probabilities by rank, per model.
    probs: Vec<sparsify::RankProbs>,
}

impl GeneralizedTaskArithmetic {
    /// Block alignment for a streamed merge of `shape`, or `None` when the
    /// tensor must be merged whole.
    pub(super) fn stream_align(&self, shape: &[usize]) -> Option<usize> {
        if self.sparsify != Sparsify::DellaMagprune {
            return Some(BLOCK);
        }
        let n: usize = shape.iter().product();
        let chunk = if shape.len() < 2 {
            n
        } else {
            shape[1] * shape[2..].iter().product::<usize>()
        };
        let a = lcm(chunk.max(1), BLOCK);
        (a <= MAX_ALIGN).then_some(a)
    }

    pub(super) fn merge_streamed_impl(
        &self,
        job: StreamJob,
        src: &dyn BlockSource,
        emit: Emit,
    ) -> Result<()> {
        let dt = job.dtype;
        crate::with_rounding!(dt, |rr| self.run(rr, &job, src, emit))
    }

    fn run<R: crate::dtype::Rounding>(
        &self,
        r: R,
        job: &StreamJob,
        src: &dyn BlockSource,
        emit: Emit,
    ) -> Result<()> {
        let name = job.name;
        let n = job.numel();
        let dt = job.dtype;
        let align = self
            .stream_align(job.shape)
            .ok_or_else(|| job.err("internal: tensor not streamable"))?;
        let block = block_size(job.block, align);
        let b = job
            .base
            .ok_or_else(|| job.err("the base model is not among this tensor's inputs"))?;
        let normalize = job.flag("normalize");
        let rescale = job.flag("rescale");
        let lambda = job.global("lambda");
        let others: Vec<usize> = (0..job.n_inputs).filter(|i| *i != b).collect();
        if others.is_empty() {
            return for_blocks(n, block, |s, _, e0, e1| {
                s.ensure(1);
                src.read(b, e0, e1, &mut s.bufs[0])?;
                emit(e0, &s.bufs[0])
            })
            .map(|_| ());
        }
        // per-model plan, as `merge` decides it
        let mut models: Vec<Model> = Vec::new();
        let mut sels: Vec<Sel> = Vec::new();
        for (k, &i) in others.iter().enumerate() {
            let w = job.model_param(i, "weight").unwrap_or(f64::NAN);
            let density = job.model_param(i, "density").unwrap_or(1.0);
            let gamma = job.model_param(i, "gamma").unwrap_or(0.01);
            let epsilon = job.model_param(i, "epsilon").unwrap_or(0.15);
            if w.is_nan() {
                return Err(Error::tensor(
                    name,
                    format!("{}: a model has no `weight`", self.name),
                ));
            }
            let stream = Stream::new(job.seed, name, &format!("{}:{k}", self.name));
            let wdt = if dt == DType::F16 { DType::F32 } else { dt };
            let mut mdt = dt;
            let sp = if self.sparsify == Sparsify::None || density >= 1.0 {
                Sp::Keep
            } else {
                match self.sparsify {
                    Sparsify::None => Sp::Keep,
                    Sparsify::Magnitude => {
                        let kk = sparsify::magnitude_k(n, density);
                        sels.push(Sel {
                            model: k,
                            kind: KeyKind::Abs,
                            s: Selection::new(n, kk, true),
                        });
                        Sp::Top(sels.len() - 1)
                    }
                    Sparsify::Random => {
                        mdt = wdt;
                        Sp::Random(density as f32)
                    }
                    Sparsify::MagnitudeOutliers => {
                        let nn = n as i64;
                        let keep = (nn as f64 * density) as i64;
                        let mut top = (nn as f64 * gamma) as i64;
                        let mut bot = nn - keep - top;
                        if bot < 0 {
                            top += bot;
                            bot = 0;
                        }
                        // mergekit 0.1.5 keeps the sorted range [bot, bot + keep)
                        // (with no outliers to drop, the largest `keep`)
                        sels.push(Sel {
                            model: k,
                            kind: KeyKind::NotAbs,
                            s: Selection::new(n, bot as usize, true),
                        });
                        sels.push(Sel {
                            model: k,
                            kind: KeyKind::Abs,
                            s: Selection::new(n, top.max(0) as usize, false),
                        });
                        Sp::Outliers(sels.len() - 2, sels.len() - 1)
                    }
                    Sparsify::DellaMagprune => {
                        if density <= 0.0 {
                            Sp::Zero
                        } else if !(density - epsilon > 0.0 && density + epsilon < 1.0) {
                            return Err(Error::tensor(
                                name,
                                format!(
                                    "della: epsilon {epsilon} must be chosen such that density ± epsilon is in (0, 1) (density {density})"
                                ),
                            ));
                        } else {
                            mdt = wdt;
                            Sp::Della
                        }
                    }
                }
            };
            models.push(Model {
                input: i,
                w: r.r(w as f32),
                sp,
                stream,
                mdt,
                rescale,
                density,
                epsilon,
            });
        }
        // DELLA's summed rank → probability tables
        let della = {
            let (len, inner) = if job.shape.len() < 2 {
                (n, 1)
            } else {
                (job.shape[1], job.shape[2..].iter().product::<usize>())
            };
            let probs: Vec<sparsify::RankProbs> = models
                .iter()
                .map(|m| {
                    if !matches!(m.sp, Sp::Della) {
                        return Default::default();
                    }
                    sparsify::RankProbs::new(len, m.density, m.epsilon, m.mdt)
                })
                .collect();
            DellaGeom { len, inner, probs }
        };

        let delta = |s: &mut Scratch, m: usize, out: usize, e0: usize, e1: usize| -> Result<()> {
            // bufs[0] = base (already read), bufs[out] = Δ of model m
            let mut x = std::mem::take(&mut s.bufs[out]);
            let fused = dt == DType::BF16
                && src.read_delta_bf16(models[m].input, e0, e1, &s.bufs[0], &mut x)?;
            if !fused {
                src.read(models[m].input, e0, e1, &mut x)?;
                crate::simd::sub_rounded(r, &mut x, &s.bufs[0]);
            }
            s.bufs[out] = x;
            Ok(())
        };

        // selections whose boundary keys the output pass counts
        let mut ordered: Vec<usize> = Vec::new();
        // 1. histograms for the selections
        let active: Vec<usize> = (0..sels.len())
            .filter(|&j| !sels[j].s.all() && !sels[j].s.none())
            .collect();
        if !active.is_empty() {
            let sel_models: Vec<usize> = dedup(active.iter().map(|&j| sels[j].model));
            // bfloat16 keys' low halves are all equal: one level suffices
            let track_lo = dt != DType::BF16;
            let hists = hist_pass(
                n,
                block,
                &sel_models,
                &active,
                &sels,
                src,
                b,
                &delta,
                None,
                track_lo,
            )?;
            let mut second: Vec<(usize, u32)> = Vec::new();
            for (a, &j) in active.iter().enumerate() {
                let h = &hists[a];
                let s = &mut sels[j].s;
                let (hi, cum) = pick_bin(&h.h, s.k as u64);
                let need = s.k as u64 - cum;
                if h.lo_or == h.lo_and {
                    s.thr = ((hi as u32) << 16) | h.lo_or;
                    s.ties = need;
                    s.eq_total = h.h[hi];
                } else {
                    s.thr = (hi as u32) << 16;
                    s.ties = need;
                    second.push((a, hi as u32));
                }
            }
            if !second.is_empty() {
                let which: Vec<usize> = second.iter().map(|(a, _)| active[*a]).collect();
                let his: Vec<u32> = second.iter().map(|(_, hi)| *hi).collect();
                let sm: Vec<usize> = dedup(which.iter().map(|&j| sels[j].model));
                let h2 = hist_pass(
                    n,
                    block,
                    &sm,
                    &which,
                    &sels,
                    src,
                    b,
                    &delta,
                    Some(&his),
                    false,
                )?;
                for (q, &j) in which.iter().enumerate() {
                    let s = &mut sels[j].s;
                    let (lo, cum2) = pick_bin(&h2[q].h, s.ties);
                    s.thr |= lo as u32;
                    s.ties -= cum2;
                    s.eq_total = h2[q].h[lo];
                }
            }
            // 2. boundary counts per block
            let counted: Vec<usize> = active
                .iter()
                .copied()
                .filter(|&j| sels[j].s.needs_counts())
                .collect();
            // a plain top-k whose masks only the output pass needs counts
            // there, in block order (see `for_blocks_ordered`)
            let in_output = |j: usize| {
                let m = &models[sels[j].model];
                matches!(m.sp, Sp::Top(jj) if jj == j) && !m.rescale
            };
            if counted.iter().all(|&j| in_output(j)) {
                ordered = counted;
            } else if !counted.is_empty() {
                let cm: Vec<usize> = dedup(counted.iter().map(|&j| sels[j].model));
                let slot_of = |m: usize| 1 + cm.iter().position(|x| *x == m).expect("model");
                let per_block: Vec<Vec<u64>> = for_blocks(n, block, |s, _, e0, e1| {
                    s.ensure(1 + cm.len());
                    let mut base = std::mem::take(&mut s.bufs[0]);
                    src.read(b, e0, e1, &mut base)?;
                    s.bufs[0] = base;
                    for (q, &m) in cm.iter().enumerate() {
                        delta(s, m, q + 1, e0, e1)?;
                    }
                    Ok(counted
                        .iter()
                        .map(|&j| {
                            let (kind, thr) = (sels[j].kind, sels[j].s.thr);
                            crate::simd::count_eq(&s.bufs[slot_of(sels[j].model)], kind.flip(), thr)
                        })
                        .collect())
                })?;
                for (q, &j) in counted.iter().enumerate() {
                    let mut acc = 0u64;
                    let mut eq: Vec<u64> = per_block
                        .iter()
                        .map(|c| {
                            let v = acc;
                            acc += c[q];
                            v
                        })
                        .collect();
                    eq.push(acc);
                    sels[j].s.eq_before = eq;
                }
            }
        }

        let mask = |s: &mut Scratch, m: usize, slot: usize, bi: usize, e0: usize| {
            // s.flags ← keep flags of Δ in bufs[slot]
            let d = &s.bufs[slot];
            let len = d.len();
            let model = &models[m];
            let mut flags = std::mem::take(&mut s.flags);
            match model.sp {
                Sp::Keep => {
                    flags.clear();
                    flags.resize(len, 1);
                }
                Sp::Zero => {
                    flags.clear();
                    flags.resize(len, 0);
                }
                Sp::Top(j) => {
                    let kind = sels[j].kind;
                    sels[j].s.mark(bi, |i| kind.key(d[i]), len, &mut flags);
                }
                Sp::Outliers(lo, hi) => {
                    let kl = sels[lo].kind;
                    sels[lo].s.mark(bi, |i| kl.key(d[i]), len, &mut flags);
                    let kh = sels[hi].kind;
                    let mut fh = std::mem::take(&mut s.flags2);
                    sels[hi].s.mark(bi, |i| kh.key(d[i]), len, &mut fh);
                    for (f, h) in flags.iter_mut().zip(&fh) {
                        *f = (*f == 0 && *h == 0) as u8;
                    }
                    s.flags2 = fh;
                }
                Sp::Random(p) => {
                    flags.resize(len, 0);
                    crate::simd::random_flags(&mut flags[..len], model.stream, e0 as u64, p);
                }
                Sp::Della => {
                    // every flag is written
                    flags.truncate(len);
                    flags.resize(len, 0);
                    della_block(
                        d,
                        &della,
                        &della.probs[m],
                        model.stream,
                        e0,
                        &mut flags,
                        &mut s.rank,
                    );
                }
            }
            s.flags = flags;
        };

        // 3. rescale sums; 4. output
        let rescaled: Vec<usize> = (0..models.len())
            .filter(|&m| models[m].rescale && !matches!(models[m].sp, Sp::Keep | Sp::Zero))
            .collect();
        // (per-BLOCK sums of |Δ| and of the kept |Δ|, the kept mask) of a
        // rescaled model whose Δ is in bufs[slot]; masks that cost a
        // ranking (DELLA) or a hash per element (DARE) are kept, a bit per
        // element, for the output pass
        let sums = |s: &mut Scratch, m: usize, slot: usize, bi: usize, e0: usize| -> Sums {
            mask(s, m, slot, bi, e0);
            let (before, after) = partial_sums2(&s.bufs[slot], &s.flags);
            let bits = matches!(models[m].sp, Sp::Della | Sp::Random(_)).then(|| {
                let mut bits = vec![0u64; s.flags.len().div_ceil(64)];
                crate::simd::pack_flags(&s.flags, &mut bits);
                bits
            });
            (before, after, bits)
        };
        let weights: Vec<f32> = models.iter().map(|m| m.w).collect();
        let consensus = self.consensus;
        let ordered_slot = |j: usize| ordered.iter().position(|x| *x == j);
        // read and Δ of every model; counts of the boundary keys in `ordered`
        let pre = |s: &mut Scratch, e0: usize, e1: usize| -> Result<Vec<u64>> {
            s.ensure(1 + models.len());
            let mut base = std::mem::take(&mut s.bufs[0]);
            src.read(b, e0, e1, &mut base)?;
            s.bufs[0] = base;
            for m in 0..models.len() {
                delta(s, m, m + 1, e0, e1)?;
            }
            Ok(ordered
                .iter()
                .map(|&j| {
                    let sel = &sels[j];
                    crate::simd::count_eq(&s.bufs[sel.model + 1], sel.kind.flip(), sel.s.thr)
                })
                .collect())
        };
        // the output of a block (after `pre`) into `s.out`: masks from
        // `bits` (per model) where given, task vectors rescaled by `ratios`
        let combine = |s: &mut Scratch,
                       bi: usize,
                       e0: usize,
                       e1: usize,
                       before: &[u64],
                       own: &[u64],
                       ratios: &[Option<f32>],
                       bits: &[Option<&[u64]>]| {
            for m in 0..models.len() {
                if matches!(models[m].sp, Sp::Keep) {
                    continue;
                }
                let model = &models[m];
                match (&model.sp, bits.get(m).copied().flatten()) {
                    (_, Some(bits)) => crate::simd::keep_bits(&mut s.bufs[m + 1], bits),
                    (Sp::Zero, None) => s.bufs[m + 1].fill(0.0),
                    (Sp::Top(j), None) => {
                        let sel = &sels[*j];
                        let d = &mut s.bufs[m + 1];
                        match ordered_slot(*j) {
                            Some(q) => sel.s.apply_with(
                                || (before[q], before[q] + own[q]),
                                d,
                                sel.kind.flip(),
                            ),
                            None => sel.s.apply(bi, d, sel.kind.flip()),
                        }
                    }
                    (Sp::Random(p), None) => {
                        crate::simd::keep_random(&mut s.bufs[m + 1], model.stream, e0 as u64, *p)
                    }
                    _ => {
                        mask(s, m, m + 1, bi, e0);
                        crate::simd::keep_flagged(&mut s.bufs[m + 1], &s.flags);
                    }
                }
                let d = &mut s.bufs[m + 1];
                if let Some(ratio) = ratios[m] {
                    match model.mdt {
                        DType::BF16 => crate::simd::scale_bf16(d, ratio),
                        DType::F32 => crate::simd::scale(d, ratio),
                        _ => crate::with_rounding!(model.mdt, |rm| for x in d.iter_mut() {
                            *x = rm.r(*x * ratio);
                        }),
                    }
                }
                if model.mdt != dt {
                    for x in d.iter_mut() {
                        *x = r.r(*x);
                    }
                }
            }
            let mut out = std::mem::take(&mut s.out);
            // every element is written by `combine_chunk`
            out.truncate(e1 - e0);
            out.resize(e1 - e0, 0.0);
            let mut cs = CombineScratch::default();
            {
                let ms: Vec<&[f32]> = s.bufs[1..1 + models.len()]
                    .iter()
                    .map(|v| v.as_slice())
                    .collect();
                for (c, o) in out.chunks_mut(SUB).enumerate() {
                    let lo = c * SUB;
                    let hi = lo + o.len();
                    let mc: Vec<&[f32]> = ms.iter().map(|m| &m[lo..hi]).collect();
                    combine_chunk(
                        r,
                        &s.bufs[0][lo..hi],
                        &mc,
                        &weights,
                        consensus,
                        normalize,
                        lambda,
                        o,
                        &mut cs,
                    );
                }
            }
            s.out = out;
        };

        let nb = n.div_ceil(block);
        let mut ratios: Vec<Option<f32>> = vec![None; models.len()];
        // rescaled masks, per block and model
        let mut cached: Vec<Vec<Option<Vec<u64>>>> = Vec::new();
        // after a speculative sums pass: the blocks it did not emit, and
        // those it emitted with other ratios than the true ones
        let mut todo: Option<(Vec<usize>, Vec<usize>)> = None;
        if !rescaled.is_empty() {
            // per block, the ratios its output was emitted with (speculation)
            let mut guesses: Option<Vec<Option<Vec<Option<f32>>>>> = None;
            let per_block: Vec<Vec<Sums>> = if !speculates(job, nb, &models) {
                for_blocks(n, block, |s, bi, e0, e1| {
                    s.ensure(1 + rescaled.len());
                    let mut base = std::mem::take(&mut s.bufs[0]);
                    src.read(b, e0, e1, &mut base)?;
                    s.bufs[0] = base;
                    let mut res = Vec::with_capacity(rescaled.len());
                    for (q, &m) in rescaled.iter().enumerate() {
                        delta(s, m, q + 1, e0, e1)?;
                        res.push(sums(s, m, q + 1, bi, e0));
                    }
                    Ok(res)
                })?
            } else {
                let est = Mutex::new(Estimate {
                    blocks: 0,
                    elements: 0,
                    before: vec![0.0; rescaled.len()],
                    after: vec![0.0; rescaled.len()],
                });
                type Done = (Vec<Sums>, Option<Vec<Option<f32>>>);
                let done: Vec<Option<Done>> = for_blocks_claimed(
                    n,
                    block,
                    &spread_order(nb, SPEC_RUN / block),
                    |s, bi, e0, e1| {
                        pre(s, e0, e1)?;
                        let res: Vec<Sums> = rescaled
                            .iter()
                            .map(|&m| sums(s, m, m + 1, bi, e0))
                            .collect();
                        let guess = {
                            let mut g = est.lock().unwrap_or_else(|e| e.into_inner());
                            g.add(e1 - e0, &res);
                            (g.blocks >= SPEC_SUMMED).then(|| g.guess(n, &rescaled, &models))
                        };
                        let Some(guess) = guess else {
                            return Ok((res, None));
                        };
                        #[cfg(test)]
                        let guess = spec_test::perturb(name, bi, guess);
                        let mut bits: Vec<Option<&[u64]>> = vec![None; models.len()];
                        for (q, &m) in rescaled.iter().enumerate() {
                            bits[m] = res[q].2.as_deref();
                        }
                        combine(s, bi, e0, e1, &[], &[], &guess, &bits);
                        emit(e0, &s.out)?;
                        Ok((res, Some(guess)))
                    },
                )?;
                let (per_block, guessed): (Vec<Vec<Sums>>, Vec<_>) = done
                    .into_iter()
                    .map(|d| d.expect("every block is in the order"))
                    .unzip();
                guesses = Some(guessed);
                per_block
            };
            ratios = final_ratios(&per_block, &rescaled, &models);
            if let Some(guessed) = guesses {
                let unsent: Vec<usize> = (0..nb).filter(|&bi| guessed[bi].is_none()).collect();
                let wrong: Vec<usize> = (0..nb)
                    .filter(|&bi| {
                        guessed[bi]
                            .as_ref()
                            .is_some_and(|g| !same_ratios(g, &ratios))
                    })
                    .collect();
                #[cfg(test)]
                spec_test::record(name, nb - unsent.len() - wrong.len(), wrong.len());
                todo = Some((unsent, wrong));
            }
            cached = per_block
                .into_iter()
                .map(|v| {
                    let mut row: Vec<Option<Vec<u64>>> = vec![None; models.len()];
                    for (q, (_, _, bits)) in v.into_iter().enumerate() {
                        row[rescaled[q]] = bits;
                    }
                    row
                })
                .collect();
        }

        // a block's output with the true ratios, into `s.out`
        let out =
            |s: &mut Scratch, bi: usize, e0: usize, e1: usize, before: &[u64], own: &[u64]| {
                let bits: Vec<Option<&[u64]>> = match cached.get(bi) {
                    Some(row) => row.iter().map(|b| b.as_deref()).collect(),
                    None => Vec::new(),
                };
                combine(s, bi, e0, e1, before, own, &ratios, &bits);
            };
        let post = |s: &mut Scratch,
                    bi: usize,
                    e0: usize,
                    e1: usize,
                    before: &[u64],
                    own: &[u64]|
         -> Result<()> {
            out(s, bi, e0, e1, before, own);
            emit(e0, &s.out)
        };
        if let Some((unsent, wrong)) = todo {
            for_listed_blocks(n, block, &unsent, |s, bi, e0, e1| {
                pre(s, e0, e1)?;
                post(s, bi, e0, e1, &[], &[])
            })?;
            // every element has been emitted once: the wrong ones again
            let again = job
                .again
                .ok_or_else(|| job.err("internal: no second emit"))?;
            for_listed_blocks(n, block, &wrong, |s, bi, e0, e1| {
                pre(s, e0, e1)?;
                out(s, bi, e0, e1, &[], &[]);
                again(e0, &s.out)
            })?;
        } else if ordered.is_empty() {
            for_blocks(n, block, |s, bi, e0, e1| {
                pre(s, e0, e1)?;
                post(s, bi, e0, e1, &[], &[])
            })?;
        } else {
            for_blocks_ordered(n, block, ordered.len(), |s, _, e0, e1| pre(s, e0, e1), post)?;
        }
        Ok(())
    }
}

impl Selection {
    pub fn new(n: usize, k: usize, low_first: bool) -> Selection {
        Selection {
            n,
            k,
            low_first,
            thr: 0,
            ties: 0,
            eq_total: 0,
            eq_before: Vec::new(),
        }
    }
}

/// A rescaled model's per-[`BLOCK`] sums of |Δ| and of the kept |Δ|, and
/// its mask (a bit per element) where the mask is worth keeping.
type Sums = (Vec<f64>, Vec<f64>, Option<Vec<u64>>);

/// The ratio `before / after` a rescaled task vector is multiplied by, from
/// its whole-tensor sums, rounded as mergekit does; `None`: not rescaled.
fn ratio_of(before: f64, after: f64, mdt: DType) -> Option<f32> {
    let (before, after) = (mdt.round(before as f32), mdt.round(after as f32));
    (!(before < 1e-7 || after < 1e-7)).then(|| mdt.round(before / after))
}

/// Every model's ratio (`None` for models not rescaled) from the sums of
/// every block, combined in block order.
fn final_ratios(per_block: &[Vec<Sums>], rescaled: &[usize], models: &[Model]) -> Vec<Option<f32>> {
    let mut ratios = vec![None; models.len()];
    for (q, &m) in rescaled.iter().enumerate() {
        let before = total(per_block.iter().flat_map(|v| v[q].0.iter().copied()));
        let after = total(per_block.iter().flat_map(|v| v[q].1.iter().copied()));
        ratios[m] = ratio_of(before, after, models[m].mdt);
    }
    ratios
}

/// Bit-for-bit equal ratios.
fn same_ratios(a: &[Option<f32>], b: &[Option<f32>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (None, None) => true,
            (Some(x), Some(y)) => x.to_bits() == y.to_bits(),
            _ => false,
        })
}

/// Blocks `0..nb` in the order the speculative sums pass takes them: first
/// [`SPEC_SPREAD`] single blocks spread over the tensor (by the fractional
/// part of `i·φ`), so that the first predictions already see the whole
/// tensor even when its rows differ along it; then runs of `group`
/// consecutive blocks, the runs in the same spread order — a run fills
/// whole output windows (one write each, see the executor's `Coalescer`)
/// where single blocks all over the tensor would be written piece by piece.
fn spread_order(nb: usize, group: usize) -> Vec<usize> {
    const PHI: f64 = 0.618_033_988_749_894_9;
    let spread = |k: usize| -> Vec<usize> {
        let mut v: Vec<usize> = (0..k).collect();
        v.sort_by(|a, b| {
            let fa = (*a as f64 * PHI).fract();
            let fb = (*b as f64 * PHI).fract();
            fa.total_cmp(&fb).then(a.cmp(b))
        });
        v
    };
    let group = group.max(1);
    let first: Vec<usize> = spread(nb)
        .into_iter()
        .take(if group > 1 { SPEC_SPREAD } else { nb })
        .collect();
    let mut taken = vec![false; nb];
    for &b in &first {
        taken[b] = true;
    }
    let mut order = first;
    for g in spread(nb.div_ceil(group)) {
        order.extend((g * group..((g + 1) * group).min(nb)).filter(|&b| !taken[b]));
    }
    order
}

/// Running sums of the blocks summed so far (in any order), per rescaled
/// model.
struct Estimate {
    blocks: usize,
    elements: usize,
    before: Vec<f64>,
    after: Vec<f64>,
}

impl Estimate {
    fn add(&mut self, len: usize, res: &[Sums]) {
        self.blocks += 1;
        self.elements += len;
        for (q, r) in res.iter().enumerate() {
            self.before[q] += r.0.iter().sum::<f64>();
            self.after[q] += r.1.iter().sum::<f64>();
        }
    }

    /// The ratios the whole tensor's sums would give if the rest of it
    /// were like the blocks summed so far.
    fn guess(&self, n: usize, rescaled: &[usize], models: &[Model]) -> Vec<Option<f32>> {
        let f = n as f64 / self.elements.max(1) as f64;
        let mut g = vec![None; models.len()];
        for (q, &m) in rescaled.iter().enumerate() {
            g[m] = ratio_of(self.before[q] * f, self.after[q] * f, models[m].mdt);
        }
        g
    }
}

/// Tensors of fewer blocks take two passes.
const SPEC_MIN_BLOCKS: usize = 4;
/// Blocks summed (this one included) before a block's output is emitted
/// with predicted ratios.
const SPEC_SUMMED: usize = 2;
/// Single blocks spread over the tensor at the head of the order, before
/// runs of consecutive blocks (see [`spread_order`]).
const SPEC_SPREAD: usize = 8;
/// Elements in a run of consecutive blocks of the speculative pass: 1 MB
/// of bfloat16 output, the executor's write window.
const SPEC_RUN: usize = 16 * BLOCK;

/// Rescaled random masks (DARE, DELLA with `rescale`) need the whole
/// tensor's sums of |Δ| and of the kept |Δ| before any output element is
/// known: without speculation, a pass for the sums and a pass for the
/// output, each reading every input. With it (where the output may be
/// written twice, [`StreamJob::again`]), the sums pass also computes and
/// emits the output of its blocks with the ratios that the blocks summed
/// so far predict (an even spread of the tensor, see [`spread_order`]).
/// Once the sums are complete, only the blocks that were not emitted (the
/// first of the order) and those whose predicted ratios differ from the
/// true ones (bit for bit, after mergekit's rounding) are read and computed
/// again, and the latter emitted again. The same bytes in every case.
/// Blocks emitted once and right, measured: 79 % of DELLA's (83 % of
/// DARE's) on the 8-layer bench family, 89 % of DELLA's on the default one;
/// the rest are mostly wrong predictions, where a sum lands near a
/// bfloat16 rounding boundary. A prediction from two blocks is already
/// right more often than not, and emitting a wrong block costs less than
/// reading it again.
fn speculates(job: &StreamJob, nb: usize, models: &[Model]) -> bool {
    let random_masks = models
        .iter()
        .all(|m| matches!(m.sp, Sp::Keep | Sp::Zero | Sp::Random(_) | Sp::Della));
    job.again.is_some() && nb >= SPEC_MIN_BLOCKS && random_masks
}

/// Test hooks of the speculative output, for tensors named [`spec_test::NAME`]
/// only (tests run in parallel).
#[cfg(test)]
pub(super) mod spec_test {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub const NAME: &str = "spec.test.weight";
    /// Every this-many-th block gets a wrong prediction (0: none).
    pub static MISS_EVERY: AtomicUsize = AtomicUsize::new(0);
    /// (blocks emitted once and right, blocks emitted again), summed.
    pub static COUNTS: Mutex<(usize, usize)> = Mutex::new((0, 0));

    pub fn perturb(name: &str, bi: usize, mut g: Vec<Option<f32>>) -> Vec<Option<f32>> {
        let k = MISS_EVERY.load(Ordering::SeqCst);
        if name == NAME && k > 0 && bi.is_multiple_of(k) {
            if let Some(x) = g.iter_mut().find(|x| x.is_some()) {
                *x = x.map(|v| v * 2.0);
            } else if let Some(x) = g.first_mut() {
                *x = Some(1.0);
            }
        }
        g
    }

    pub fn record(name: &str, right: usize, wrong: usize) {
        if name == NAME {
            let mut c = COUNTS.lock().unwrap();
            c.0 += right;
            c.1 += wrong;
        }
    }
}

/// Per-[`BLOCK`] partial sums of |Δ| and of |Δ| where kept, each exactly as
/// [`sum_abs`] makes them.
fn partial_sums2(d: &[f32], f: &[u8]) -> (Vec<f64>, Vec<f64>) {
    d.chunks(BLOCK)
        .zip(f.chunks(BLOCK))
        .map(|(dc, fc)| crate::simd::abs_sums(dc, fc))
        .unzip()
}

fn dedup(it: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

/// Computes Δ of model `m` for elements `e0..e1` into `bufs[slot]` (the base
/// being in `bufs[0]`): `(scratch, m, slot, e0, e1)`.
type DeltaFn<'a> = dyn Fn(&mut Scratch, usize, usize, usize, usize) -> Result<()> + Sync + 'a;

/// One histogram pass: for each selection in `which`, the 16-bit histogram
/// of key high halves (or, with `his`, of low halves of keys whose high half
/// is `his[q]`).
#[allow(clippy::too_many_arguments)]
fn hist_pass(
    n: usize,
    block: usize,
    sel_models: &[usize],
    which: &[usize],
    sels: &[Sel],
    src: &dyn BlockSource,
    b: usize,
    delta: &DeltaFn,
    his: Option<&[u32]>,
    track_lo: bool,
) -> Result<Vec<Hist>> {
    let nb = n.div_ceil(block);
    let p = HistPass {
        n,
        block,
        sel_models,
        which,
        sels,
        src,
        b,
        delta,
    };
    if his.is_none()
        && !track_lo
        && nb >= WINDOW_MIN_BLOCKS
        && crate::simd::compacts()
        && let Some(h) = p.windowed()?
    {
        return Ok(h);
    }
    let all: Vec<usize> = (0..nb).collect();
    let (h, _) = p.run(&all, his, track_lo, None)?;
    Ok(h)
}

/// Tensors of at least this many blocks count bfloat16 keys through a
/// window (see [`HistPass::windowed`]).
const WINDOW_MIN_BLOCKS: usize = 32;

/// The inputs of a histogram pass.
struct HistPass<'a> {
    n: usize,
    block: usize,
    sel_models: &'a [usize],
    which: &'a [usize],
    sels: &'a [Sel],
    src: &'a dyn BlockSource,
    b: usize,
    delta: &'a DeltaFn<'a>,
}

impl HistPass<'_> {
    /// Histograms of the listed blocks; with `window = Some`, only key high
    /// halves in `window[q]` are binned, and the counts of keys above each
    /// window come back too.
    fn run(
        &self,
        list: &[usize],
        his: Option<&[u32]>,
        track_lo: bool,
        window: Option<&[(u32, u32)]>,
    ) -> Result<(Vec<Hist>, Vec<u64>)> {
        let (sel_models, which, sels) = (self.sel_models, self.which, self.sels);
        let slot_of = |m: usize| 1 + sel_models.iter().position(|x| *x == m).expect("model");
        // one set of histograms per pool thread, made when the thread first
        // counts and kept for the whole pass (a set per rayon split would
        // allocate, zero and add megabytes per tensor)
        type Slot = Option<(Vec<LocalHist>, Vec<u64>)>;
        let slots: Vec<std::sync::Mutex<Slot>> = (0..rayon::current_num_threads().max(1))
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        for_listed_blocks(self.n, self.block, list, |s, _, e0, e1| -> Result<()> {
            s.ensure(1 + sel_models.len());
            let mut base = std::mem::take(&mut s.bufs[0]);
            self.src.read(self.b, e0, e1, &mut base)?;
            s.bufs[0] = base;
            for (q, &m) in sel_models.iter().enumerate() {
                (self.delta)(s, m, q + 1, e0, e1)?;
            }
            let t = rayon::current_thread_index().unwrap_or(0) % slots.len();
            let mut g = slots[t].lock().unwrap_or_else(|p| p.into_inner());
            let (hs, above) = g.get_or_insert_with(|| {
                (
                    (0..which.len()).map(|_| LocalHist::new()).collect(),
                    vec![0; which.len()],
                )
            });
            for (q, &j) in which.iter().enumerate() {
                let flip = sels[j].kind.flip();
                let d = &s.bufs[slot_of(sels[j].model)];
                let h = &mut hs[q];
                h.room(d.len());
                match (his, window) {
                    (_, Some(w)) => {
                        above[q] += crate::simd::hist_window(d, flip, w[q].0, w[q].1, &mut h.h);
                        (h.lo_or, h.lo_and) = (flip & 0xFFFF, flip & 0xFFFF);
                    }
                    (None, None) if track_lo => {
                        let mut lo = (h.lo_or, h.lo_and);
                        crate::simd::hist_hi(d, flip, &mut h.h, Some(&mut lo));
                        (h.lo_or, h.lo_and) = lo;
                    }
                    (None, None) => {
                        crate::simd::hist_hi(d, flip, &mut h.h, None);
                        // bfloat16: every low half is that of `flip`
                        (h.lo_or, h.lo_and) = (flip & 0xFFFF, flip & 0xFFFF);
                    }
                    (Some(his), None) => crate::simd::hist_lo(d, flip, his[q], &mut h.h),
                }
            }
            Ok(())
        })?;
        let mut total = vec![Hist::new(); which.len()];
        let mut above = vec![0u64; which.len()];
        for slot in slots {
            if let Some((hs, ab)) = slot.into_inner().unwrap_or_else(|p| p.into_inner()) {
                for (t, h) in total.iter_mut().zip(hs) {
                    h.add_to(t);
                }
                for (t, a) in above.iter_mut().zip(ab) {
                    *t += a;
                }
            }
        }
        Ok((total, above))
    }

    /// bfloat16 top-level histograms counted through windows: a strided
    /// sample of blocks (about an eighth of the blocks, at most 8) is binned
    /// whole; its histogram places each selection's threshold within a
    /// window of key values wide enough to hold it with a wide margin
    /// (6 σ of the sample quantile plus 1 % of the sample); the other blocks
    /// bin only keys inside the window and count those above it
    /// ([`crate::simd::hist_window`], several times faster than binning
    /// everything). The keys outside each window are then added as one bin
    /// just above and one just below it, so every count from the top is
    /// exact down through the window. `None` when a threshold falls outside
    /// its window after all: the caller counts everything again, so the
    /// result never depends on the sample, only the time does.
    fn windowed(&self) -> Result<Option<Vec<Hist>>> {
        let nb = self.n.div_ceil(self.block);
        let stride = nb / 8;
        let sample: Vec<usize> = (0..8).map(|i| i * stride + stride / 2).collect();
        let rest: Vec<usize> = (0..nb).filter(|b| !sample.contains(b)).collect();
        let (mut hists, _) = self.run(&sample, None, false, None)?;
        let len_of = |b: usize| ((b + 1) * self.block).min(self.n) - b * self.block;
        let s_n = sample.iter().map(|b| len_of(*b)).sum::<usize>() as f64;
        let windows: Vec<(u32, u32)> = self
            .which
            .iter()
            .zip(&hists)
            .map(|(&j, h)| {
                let ka = self.sels[j].s.k as f64 * s_n / self.n as f64;
                let margin = 6.0 * (ka * (1.0 - ka / s_n)).max(0.0).sqrt() + 0.01 * s_n + 16.0;
                let (top, bottom) = (ka - margin, ka + margin);
                let hi = if top < 1.0 {
                    0xFFFF
                } else {
                    pick_bin(&h.h, top.ceil() as u64).0 as u32
                };
                let lo = if bottom >= s_n {
                    0
                } else {
                    pick_bin(&h.h, bottom as u64).0 as u32
                };
                (lo, hi)
            })
            .collect();
        let (rest_h, above) = self.run(&rest, None, false, Some(&windows))?;
        let rest_n = self.n as u64 - s_n as u64;
        for (q, (&j, h)) in self.which.iter().zip(hists.iter_mut()).enumerate() {
            let (lo, hi) = windows[q];
            let r = &rest_h[q];
            let inside: u64 = r.h[lo as usize..=hi as usize].iter().sum();
            for (t, c) in h.h.iter_mut().zip(&r.h) {
                *t += c;
            }
            let below = rest_n - above[q] - inside;
            if hi < 0xFFFF {
                h.h[hi as usize + 1] += above[q];
            }
            if lo > 0 {
                h.h[lo as usize - 1] += below;
            }
            let (at, _) = pick_bin(&h.h, self.sels[j].s.k as u64);
            if at < lo as usize
                || at > hi as usize
                || (hi == 0xFFFF && above[q] != 0)
                || (lo == 0 && below != 0)
            {
                return Ok(None);
            }
        }
        Ok(Some(hists))
    }
}

/// A thread's histogram: 32-bit counts (half the cache footprint of
/// [`Hist`]'s), folded into 64-bit ones before they could overflow.
struct LocalHist {
    h: Vec<u32>,
    added: u64,
    lo_or: u32,
    lo_and: u32,
    /// Counts flushed from `h` (only when a thread counts ≥ 2³² keys).
    acc: Option<Vec<u64>>,
}

impl LocalHist {
    fn new() -> LocalHist {
        LocalHist {
            h: vec![0; 1 << 16],
            added: 0,
            lo_or: 0,
            lo_and: 0xFFFF,
            acc: None,
        }
    }
    /// Makes room for `k` more counts.
    fn room(&mut self, k: usize) {
        if self.added + k as u64 > u32::MAX as u64 {
            let acc = self.acc.get_or_insert_with(|| vec![0; 1 << 16]);
            for (a, c) in acc.iter_mut().zip(self.h.iter_mut()) {
                *a += *c as u64;
                *c = 0;
            }
            self.added = 0;
        }
        self.added += k as u64;
    }
    /// Adds everything counted to `t`.
    fn add_to(self, t: &mut Hist) {
        for (a, c) in t.h.iter_mut().zip(&self.h) {
            *a += *c as u64;
        }
        if let Some(acc) = &self.acc {
            for (a, c) in t.h.iter_mut().zip(acc) {
                *a += c;
            }
        }
        t.lo_or |= self.lo_or;
        t.lo_and &= self.lo_and;
    }
}

crate::simd::multiversion! {
/// DELLA keep flags of one block (whole rank chunks): per row along axis 1,
/// each |Δ| gets the mean keep probability of the ranks its magnitude
/// occupies ([`sparsify::tie_mean`]; a magnitude that occurs once gets its
/// rank's), then a draw. `s` provides the buffers. Compiled for wide
/// vectors with everything it calls inlined.
#[allow(clippy::too_many_arguments)]
fn della_block(
    d: &[f32],
    g: &DellaGeom,
    rp: &sparsify::RankProbs,
    stream: Stream,
    e0: usize,
    flags: &mut [u8],
    s: &mut RankBufs
) {
    let (len, inner) = (g.len, g.inner);
    let chunk = len * inner;
    let mut probs = std::mem::take(&mut s.probs);
    for (o, dc) in d.chunks(chunk).enumerate() {
        let base = o * chunk;
        for c in 0..inner {
            if inner == 1 {
                // the row's f32 bits are its keys (the sign is masked off
                // where they are read)
                let keys = f32_bits(dc);
                let f = &mut flags[base..base + keys.len()];
                if row_lut(keys, s, rp) {
                    crate::simd::della_flags_lut(f, &s.bins, &s.lut, stream, (e0 + base) as u64);
                    // bin 1's elements: their own probabilities
                    bin1_probs(s, rp, |j, q| {
                        f[j] = stream.bernoulli((e0 + base + j) as u64, q) as u8;
                    });
                }
            } else {
                let mut keys = std::mem::take(&mut s.keys32);
                keys.clear();
                keys.extend((0..len).map(|j| abs_key(dc[j * inner + c])));
                // every probability is written
                probs.truncate(keys.len());
                probs.resize(keys.len(), 0.0);
                row_probs(&keys, s, rp, &mut probs);
                s.keys32 = keys;
                for (j, p) in probs.iter().enumerate() {
                    let i = base + j * inner + c;
                    flags[i] = stream.bernoulli((e0 + i) as u64, *p) as u8;
                }
            }
        }
    }
    s.probs = probs;
}
}

/// The bits of `x` (each element's [`abs_key`] once its sign bit is masked).
#[inline(always)]
fn f32_bits(x: &[f32]) -> &[u32] {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit
    // pattern is a valid u32.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u32>(), x.len()) }
}

/// `probs[j]`: the keep probability of `keys[j]` (f32 bits; the sign bit
/// is ignored) in its row, the mean of the probabilities of the ranks its
/// key occupies (ascending).
///
/// A counting sort's bins: keys are shifted right by the low bits no key
/// sets (16 for bfloat16); key values in the top `len` (a window) get bins
/// 2..; keys equal to the smallest key (exact zeros of a task vector, a
/// percent of a bfloat16 row) bin 0; other keys under the window (rare)
/// bin 1 and go to `s.keys` as `(key << 32) | index`, sorted. One counting
/// loop, then a probability per occupied bin, then a gather: no per-element
/// rank (equal keys share one probability).
#[inline(always)]
fn row_probs(keys: &[u32], s: &mut RankBufs, rp: &sparsify::RankProbs, probs: &mut [f32]) {
    if row_lut(keys, s, rp) {
        crate::simd::gather_f32(&s.lut, &s.bins, probs);
        bin1_probs(s, rp, |j, q| probs[j] = q);
    }
}

/// The counting sort of [`row_probs`]: `s.bins`, `s.counts` (per bin),
/// `s.keys` (bin 1, sorted) and `s.lut` (the probability of every occupied
/// bin but 1); false for an empty row.
#[inline(always)]
fn row_lut(keys: &[u32], s: &mut RankBufs, rp: &sparsify::RankProbs) -> bool {
    const ABS: u32 = 0x7FFF_FFFF;
    let len = keys.len();
    s.keys.clear();
    s.counts.clear();
    if len == 0 {
        s.bins.clear();
        return false;
    }
    let (mut lo, mut hi, mut or) = (u32::MAX, 0u32, 0u32);
    for k in keys {
        let k = *k & ABS;
        lo = lo.min(k);
        hi = hi.max(k);
        or |= k;
    }
    let sh = or.trailing_zeros().min(31);
    let (min, hi) = (lo >> sh, hi >> sh);
    let window = len.max(256) as u32;
    let lo = min.max(hi.saturating_sub(window - 1));
    // every bin is written: no need to clear
    s.bins.truncate(len);
    s.bins.resize(len, 0);
    crate::simd::bins_of(keys, sh, lo, min, &mut s.bins);
    let nbins = (hi - lo) as usize + 3;
    s.counts.resize(nbins, 0);
    // `counts2` is all zeros between rows (cleared as it is added)
    if s.counts2.len() < nbins {
        s.counts2.resize(nbins, 0);
    }
    count_bins(&s.bins, &mut s.counts, &mut s.counts2[..nbins]);
    for (a, b) in s.counts.iter_mut().zip(&mut s.counts2[..nbins]) {
        *a += *b;
        *b = 0;
    }
    let under = s.counts[1] as usize;
    if under != 0 {
        if under * 16 < len {
            // a few: skip 16-bin chunks without any
            for (q, ch) in s.bins.chunks(16).enumerate() {
                if !ch.iter().fold(false, |a, b| a | (*b == 1)) {
                    continue;
                }
                for (jj, b) in ch.iter().enumerate() {
                    if *b == 1 {
                        let j = q * 16 + jj;
                        s.keys.push((((keys[j] & ABS) as u64) << 32) | j as u64);
                    }
                }
            }
        } else {
            // branch-free: every element is written, the count moves past
            // those in bin 1
            s.keys.resize(len, 0);
            let out = &mut s.keys[..];
            let mut n = 0;
            for (j, (b, k)) in s.bins.iter().zip(keys).enumerate() {
                out[n.min(len - 1)] = (((*k & ABS) as u64) << 32) | j as u64;
                n += (*b == 1) as usize;
            }
            s.keys.truncate(under);
        }
        s.keys.sort_unstable();
    }
    // a probability per occupied bin, ranks ascending: bin 0, bin 1's keys
    // (see `bin1_probs`), the window's bins; only occupied bins are read,
    // so `lut` is not cleared
    if s.lut.len() < s.counts.len() {
        s.lut.resize(s.counts.len(), 0.0);
    }
    let c0 = s.counts[0] as usize;
    if c0 != 0 {
        s.lut[0] = rp.tie_mean(0, c0);
    }
    let nz = crate::simd::nonzero_indices(&s.counts, 2, &mut s.nz);
    crate::simd::tie_means(
        &s.nz[..nz],
        &s.counts,
        &rp.cum,
        &rp.inv,
        c0 + under,
        &mut s.lut,
    );
    true
}

/// Calls `put(j, probability)` for the elements of bin 1 (see
/// [`row_probs`]), in key order.
#[inline(always)]
fn bin1_probs(s: &RankBufs, rp: &sparsify::RankProbs, put: impl FnMut(usize, f32)) {
    rp.for_sorted(&s.keys, s.counts[0] as usize, put);
}

/// The counting loop, kept out of line: scalar, with registers of its own,
/// into two sets of counts (even and odd elements), so that runs of equal
/// bins wait on half as many stores (measured: the loop −30 %).
#[inline(never)]
fn count_bins(bins: &[u32], c0: &mut [u32], c1: &mut [u32]) {
    let mut it = bins.chunks_exact(2);
    for p in &mut it {
        c0[p[0] as usize] += 1;
        c1[p[1] as usize] += 1;
    }
    for b in it.remainder() {
        c0[*b as usize] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct VecSource(Vec<Vec<f32>>);
    impl BlockSource for VecSource {
        fn read(&self, i: usize, e0: usize, e1: usize, out: &mut Vec<f32>) -> Result<()> {
            out.clear();
            out.extend_from_slice(&self.0[i][e0..e1]);
            Ok(())
        }
    }

    /// Inputs with many equal magnitudes (coarse steps), in `dt`'s precision.
    fn inputs(n: usize, models: usize, dt: DType, seed: u64) -> Vec<Vec<f32>> {
        let s = Stream::new(seed, "inputs", "x");
        (0..models)
            .map(|m| {
                (0..n)
                    .map(|i| {
                        let u = s.uniform((m * n + i) as u64);
                        let step = if i % 3 == 0 { 64.0 } else { 4096.0 };
                        dt.round(((u - 0.5) * step).round() / step)
                    })
                    .collect()
            })
            .collect()
    }

    fn check(method: &str, dt: DType, shape: &[usize], pm: &[(f64, f64)], extra: &[(&str, f64)]) {
        check_named(
            "model.layers.0.mlp.up_proj.weight",
            method,
            dt,
            shape,
            pm,
            extra,
        )
    }

    fn check_named(
        name: &str,
        method: &str,
        dt: DType,
        shape: &[usize],
        pm: &[(f64, f64)],
        extra: &[(&str, f64)],
    ) {
        let m = get(method).unwrap();
        let n: usize = shape.iter().product();
        let mut global: ParamValues = m
            .global_params()
            .iter()
            .filter_map(|p| p.default.map(|d| (p.name.to_string(), d)))
            .collect();
        let mut per_model: Vec<ParamValues> = vec![ParamValues::new()];
        for (w, d) in pm {
            let mut p: ParamValues =
                [("weight".to_string(), *w), ("density".to_string(), *d)].into();
            for (k, v) in extra {
                if let Some(k) = k.strip_prefix("pm_") {
                    p.insert(k.to_string(), *v);
                }
            }
            per_model.push(p);
        }
        for (k, v) in extra {
            if !k.starts_with("pm_") {
                global.insert(k.to_string(), *v);
            }
        }
        let data = inputs(n, pm.len() + 1, dt, n as u64 + pm.len() as u64);
        let whole = m
            .merge(MergeJob {
                name,
                tensors: data
                    .iter()
                    .map(|d| Tensor::new(shape.to_vec(), d.clone(), dt))
                    .collect(),
                base: Some(0),
                global: &global,
                per_model: per_model.iter().collect(),
                is_embed: false,
                seed: 7,
            })
            .unwrap();
        let Some(align) = m.stream_align(shape, &global, &per_model) else {
            // only DELLA refuses, when a rank row is not block-aligned
            assert!(
                method.starts_with("della") && shape.len() == 1,
                "{method} {shape:?}"
            );
            return;
        };
        let out = Mutex::new(vec![f32::NAN; n]);
        let src = VecSource(data);
        let emit = |e0: usize, v: &[f32]| -> Result<()> {
            out.lock().unwrap()[e0..e0 + v.len()].copy_from_slice(v);
            Ok(())
        };
        m.merge_streamed(
            StreamJob {
                name,
                shape,
                dtype: dt,
                n_inputs: pm.len() + 1,
                base: Some(0),
                global: &global,
                per_model: per_model.iter().collect(),
                seed: 7,
                block: align,
                again: Some(&emit),
            },
            &src,
            &emit,
        )
        .unwrap();
        let out = out.into_inner().unwrap();
        let same = whole
            .data
            .iter()
            .zip(&out)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{method} {dt} {shape:?} {pm:?} {extra:?}: streamed differs"
        );
    }

    /// Windowed bfloat16 histograms give the exact top-k threshold bin and
    /// its count (as binning every key does), or give up when the sampled
    /// blocks mislead (their magnitudes unlike the rest's): never a wrong
    /// threshold.
    #[test]
    fn windowed_histograms_are_exact_or_give_up() {
        let nb = 40;
        let n = nb * BLOCK;
        let s = Stream::new(5, "window", "x");
        for misleading in [false, true] {
            let stride = nb / 8;
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    let b = i / BLOCK;
                    let big = misleading && b % stride == stride / 2;
                    let u = s.uniform(i as u64) - 0.5;
                    crate::dtype::bf16_round(if big { u * 100.0 } else { u * 0.01 })
                })
                .collect();
            let src = VecSource(vec![vec![0.0; n], x]);
            let delta = |s: &mut Scratch, _m: usize, out: usize, e0: usize, e1: usize| {
                let mut v = std::mem::take(&mut s.bufs[out]);
                src.read(1, e0, e1, &mut v)?;
                crate::simd::sub_rounded(crate::dtype::Bf16Rounding, &mut v, &s.bufs[0]);
                s.bufs[out] = v;
                Ok(())
            };
            for (kind, k) in [
                (KeyKind::Abs, n / 2),
                (KeyKind::Abs, n / 50),
                (KeyKind::NotAbs, n / 3),
            ] {
                let sels = vec![Sel {
                    model: 0,
                    kind,
                    s: Selection::new(n, k, true),
                }];
                let p = HistPass {
                    n,
                    block: BLOCK,
                    sel_models: &[0],
                    which: &[0],
                    sels: &sels,
                    src: &src,
                    b: 0,
                    delta: &delta,
                };
                let all: Vec<usize> = (0..nb).collect();
                let (exact, _) = p.run(&all, None, false, None).unwrap();
                match p.windowed().unwrap() {
                    Some(w) => {
                        assert!(!misleading, "a misleading sample was trusted");
                        let (at, cum) = pick_bin(&exact[0].h, k as u64);
                        assert_eq!(pick_bin(&w[0].h, k as u64), (at, cum));
                        assert_eq!(w[0].h[at], exact[0].h[at]);
                    }
                    None => assert!(misleading, "gave up on an even tensor ({k})"),
                }
            }
        }
    }

    /// `row_probs` gives every element the mean probability of the ranks
    /// its magnitude occupies (counted directly here), whatever the spread
    /// of the keys (zeros, tiny values, NaN, all equal, wide f32, keys
    /// under the counting window); a magnitude that occurs once gets its
    /// rank's probability exactly, and the row's probabilities add up to
    /// the table's.
    #[test]
    fn row_probabilities_are_tie_means_of_ranks() {
        let s = Stream::new(3, "ranks", "x");
        let cases: Vec<Vec<f32>> = vec![
            (0..2048)
                .map(|i| crate::dtype::bf16_round(s.uniform(i) - 0.5))
                .collect(),
            (0..2048)
                .map(|i| {
                    let u = s.uniform(i) - 0.5;
                    match i % 7 {
                        0 => 0.0,
                        1 => u * 1e-30,
                        2 => f32::NAN,
                        _ => crate::dtype::bf16_round(u),
                    }
                })
                .collect(),
            vec![0.25; 700],
            (0..3000).map(|i| (s.uniform(i) - 0.5) * 1e3).collect(),
            // many keys under the window (bin 1), with ties among them
            (0..1000)
                .map(|i| crate::dtype::bf16_round((s.uniform(i) - 0.5) * (1 << (i % 20)) as f32))
                .collect(),
            vec![1.0],
        ];
        // one set of buffers for every row, long and short, as a thread uses
        // them (scratch left by a row must not leak into the next)
        let mut b = RankBufs::default();
        for d in cases {
            let len = d.len();
            let key = |j: usize| abs_key(d[j]);
            for dt in [DType::BF16, DType::F32] {
                let rp = sparsify::RankProbs::new(len, 0.5, 0.1, dt);
                let cum = &rp.cum;
                // raw bits: row_probs ignores the sign
                let mut probs = vec![f32::NAN; len];
                row_probs(f32_bits(&d), &mut b, &rp, &mut probs);
                let mut sum = 0f64;
                for (j, p) in probs.iter().enumerate() {
                    let below = (0..len).filter(|&i| key(i) < key(j)).count();
                    let equal = (0..len).filter(|&i| key(i) == key(j)).count();
                    let want = rp.tie_mean(below, equal);
                    // bits: a row of one has a NaN probability (0 / 0)
                    assert_eq!(p.to_bits(), want.to_bits(), "element {j} of {len}");
                    if equal == 1 {
                        assert_eq!(
                            (*p as f64).to_bits(),
                            (cum[below + 1] - cum[below]).to_bits()
                        );
                    }
                    sum += *p as f64;
                }
                if len > 1 {
                    assert!(
                        (sum - cum[len]).abs() < 1e-4 * len as f64,
                        "{sum} vs {}",
                        cum[len]
                    );
                }
            }
        }
    }

    /// The SIMD helpers of the ranking equal plain loops.
    #[test]
    fn ranking_kernels_match_plain_loops() {
        let s = Stream::new(5, "gather", "x");
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            let lut: Vec<f32> = (0..n.max(1)).map(|i| i as f32 * 0.5).collect();
            // some indices past the end (clamped)
            let idx: Vec<u32> = (0..n + 7)
                .map(|i| (s.uniform(i as u64) * (lut.len() + 3) as f32) as u32)
                .collect();
            let mut out = vec![f32::NAN; idx.len()];
            crate::simd::gather_f32(&lut, &idx, &mut out);
            for (o, i) in out.iter().zip(&idx) {
                assert_eq!(*o, lut[(*i as usize).min(lut.len() - 1)]);
            }
            // probabilities across (0, 1), with 0, 1 and NaN
            let probs: Vec<f32> = (0..lut.len())
                .map(|i| match i % 11 {
                    0 => 0.0,
                    1 => 1.0,
                    2 => f32::NAN,
                    _ => s.uniform(500 + i as u64),
                })
                .collect();
            for e0 in [0u64, 3, 1 << 40, (1 << 32) - 21] {
                let st = Stream::new(e0, "flags", "x");
                let mut f = vec![7u8; idx.len()];
                crate::simd::della_flags_lut(&mut f, &idx, &probs, st, e0);
                for (j, (x, i)) in f.iter().zip(&idx).enumerate() {
                    let p = probs[(*i as usize).min(probs.len() - 1)];
                    assert_eq!(*x, st.bernoulli(e0 + j as u64, p) as u8, "flag {j} of {n}");
                }
            }
            let c: Vec<u32> = (0..n)
                .map(|i| {
                    if s.uniform(1000 + i as u64) < 0.3 {
                        i as u32 + 1
                    } else {
                        0
                    }
                })
                .collect();
            for from in [0, 2, 5, n] {
                let mut nz = vec![99];
                let k = crate::simd::nonzero_indices(&c, from, &mut nz);
                nz.truncate(k);
                let want: Vec<u32> = (from..n).filter(|&i| c[i] != 0).map(|i| i as u32).collect();
                assert_eq!(nz, want, "n {n} from {from}");
                // the mean probability of each occupied bin's ranks
                let total: usize = nz.iter().map(|b| c[*b as usize] as usize).sum();
                let rp = sparsify::RankProbs::new(total + 3, 0.5, 0.2, DType::F32);
                let mut lut = vec![-1f32; n.max(1)];
                crate::simd::tie_means(&nz, &c, &rp.cum, &rp.inv, 3, &mut lut);
                let mut acc = 3;
                for i in 0..n {
                    if nz.contains(&(i as u32)) {
                        let k = c[i] as usize;
                        assert_eq!(lut[i], rp.tie_mean(acc, k), "bin {i} of {n}");
                        acc += k;
                    } else {
                        assert_eq!(lut[i], -1.0, "bin {i} of {n} is not occupied");
                    }
                }
            }
        }
    }

    /// Streamed merges equal whole-tensor merges bit for bit, across block
    /// boundaries, with many ties at the top-k threshold, for every method
    /// of the family and every float working dtype.
    #[test]
    fn streamed_equals_whole() {
        // sizes from which tensors are streamed (smaller ones pick top-k
        // ties in torch's order, whole)
        assert_eq!(sparsify::TORCH_TIE_ORDER_BELOW, 4 * BLOCK);
        let shapes: [&[usize]; 3] = [&[256, 512], &[4 * BLOCK + 123], &[24, 64, 96]];
        for dt in [DType::BF16, DType::F16, DType::F32] {
            for shape in shapes {
                let pm = [(0.5, 0.3), (0.7, 0.6)];
                for method in [
                    "task_arithmetic",
                    "ties",
                    "dare_linear",
                    "dare_ties",
                    "breadcrumbs",
                    "breadcrumbs_ties",
                    "della",
                    "della_linear",
                ] {
                    let eps: &[(&str, f64)] = if method.starts_with("della") {
                        &[("pm_epsilon", 0.1)]
                    } else {
                        &[]
                    };
                    check(method, dt, shape, &pm, eps);
                }
                check("ties", dt, shape, &pm, &[("rescale", 1.0), ("lambda", 0.8)]);
                check(
                    "dare_ties",
                    dt,
                    shape,
                    &pm,
                    &[("rescale", 0.0), ("normalize", 1.0)],
                );
                check(
                    "breadcrumbs",
                    dt,
                    shape,
                    &pm,
                    &[("rescale", 1.0), ("pm_gamma", 0.05)],
                );
                check("ties", dt, shape, &[(1.0, 1.0), (0.3, 0.999)], &[]);
            }
        }
    }
    /// Rescaled DARE / DELLA emit most blocks in their sums pass with
    /// predicted ratios: the output equals the whole-tensor merge whether
    /// the predictions are right, partly wrong or all wrong (those blocks
    /// emitted again), and every case happens.
    #[test]
    fn speculative_output_equals_whole() {
        use std::sync::atomic::Ordering;
        let _one = SPEC_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let counts = || *spec_test::COUNTS.lock().unwrap();
        let shapes: [&[usize]; 2] = [&[48, 4096], &[12 * BLOCK + 77]];
        for miss in [0, 3, 1] {
            spec_test::MISS_EVERY.store(miss, Ordering::SeqCst);
            let (right0, wrong0) = counts();
            for dt in [DType::BF16, DType::F16, DType::F32] {
                for shape in shapes {
                    for method in ["dare_ties", "dare_linear", "della", "della_linear"] {
                        if method.starts_with("della") && shape.len() == 1 {
                            continue;
                        }
                        check_named(
                            spec_test::NAME,
                            method,
                            dt,
                            shape,
                            &[(0.5, 0.4), (0.7, 0.6)],
                            &[("pm_epsilon", 0.1), ("rescale", 1.0)],
                        );
                    }
                }
            }
            let (right, wrong) = counts();
            let (right, wrong) = (right - right0, wrong - wrong0);
            match miss {
                0 => assert!(right > 0, "no block was emitted once (wrong {wrong})"),
                1 => assert!(right == 0 && wrong > 0, "right {right} wrong {wrong}"),
                _ => assert!(right > 0 && wrong > 0, "right {right} wrong {wrong}"),
            }
        }
        spec_test::MISS_EVERY.store(0, Ordering::SeqCst);
    }

    /// The speculative pass's order: every block once, spread single
    /// blocks first, then whole runs of consecutive blocks.
    #[test]
    fn spread_order_is_a_permutation_of_spread_blocks_then_runs() {
        for (nb, group) in [(1, 16), (5, 16), (40, 16), (1000, 16), (37, 1), (100, 7)] {
            let o = spread_order(nb, group);
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..nb).collect::<Vec<_>>(), "{nb} {group}");
            if group == 1 || nb < 2 * SPEC_SPREAD {
                continue;
            }
            // the first blocks lie in different runs, far apart
            let heads = &o[..SPEC_SPREAD];
            let mut runs: Vec<usize> = heads.iter().map(|b| b / group).collect();
            runs.dedup();
            assert!(runs.len() > SPEC_SPREAD / 2, "{heads:?}");
            assert!(heads.iter().any(|&b| b >= nb / 2) && heads.iter().any(|&b| b < nb / 2));
            // then ascending runs within a run of `group`
            for w in o[SPEC_SPREAD..].windows(2) {
                if w[0] / group == w[1] / group {
                    assert!(w[0] < w[1], "{w:?}");
                }
            }
        }
    }

    /// [`spec_test`]'s counters are shared: one test at a time uses them.
    static SPEC_LOCK: Mutex<()> = Mutex::new(());
}

#[cfg(test)]
mod probe {
    use super::*;
    /// Timing probe (not a test of behaviour): `cargo test --release -p
    /// smelt-core --lib probe -- --ignored --nocapture`; rows of bf16 task
    /// vectors from SMELT_PROBE_ROWS=file:len,...
    #[test]
    #[ignore]
    fn rank_probe() {
        let spec = std::env::var("SMELT_PROBE_ROWS").unwrap_or_default();
        for item in spec.split(',').filter(|x| !x.is_empty()) {
            let (file, len) = item.split_once(':').unwrap();
            let len: usize = len.parse().unwrap();
            let bytes = std::fs::read(file).unwrap();
            let vals: Vec<f32> = bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect();
            let n = vals.len() / len * len;
            let rp = sparsify::RankProbs::new(len, 0.5, 0.1, DType::BF16);
            let g = DellaGeom {
                len,
                inner: 1,
                probs: vec![rp.clone()],
            };
            let mut b = RankBufs::default();
            let mut flags = vec![0u8; n];
            let st = Stream::new(1, "x", "y");
            // the fastest and the median of 40 runs (the machine is noisy)
            let mut ns: Vec<f64> = (0..40)
                .map(|_| {
                    let t = std::time::Instant::now();
                    della_block(&vals[..n], &g, &rp, st, 0, &mut flags, &mut b);
                    t.elapsed().as_nanos() as f64 / n as f64
                })
                .collect();
            ns.sort_by(f64::total_cmp);
            println!("{file}: {:.3} ns/element (median {:.3})", ns[0], ns[20]);
        }
    }
}
