//! Runs a plan: reads each task's inputs, merges, casts, writes the bytes
//! into the planned shard slot. The same code serves `smelt merge` and (for a
//! subset of tasks) a cluster worker.
//!
//! Memory stays bounded: tasks run in windows whose estimated working set
//! fits the memory budget; inside a window tasks run in parallel (rayon), and
//! kernels parallelise inside a tensor.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::io::{ByteSource, ModelTensors, TensorLoc, TensorSink};
use crate::methods::{self, MergeJob};
use crate::plan::{InputSource, MergePlan, TensorTask};
use crate::tensor::Tensor;

/// Default working-set budget when none is given.
pub const DEFAULT_MEMORY_BUDGET: u64 = 2 << 30;

/// Reads one input of a task, cast to the working dtype.
pub fn load_input(task: &TensorTask, i: usize, models: &[ModelTensors]) -> Result<Tensor> {
    read_input(task, &task.inputs[i], models)
}

/// Reads a task input (or extra input), cast to the working dtype.
pub fn read_input(
    task: &TensorTask,
    inp: &crate::plan::TaskInput,
    models: &[ModelTensors],
) -> Result<Tensor> {
    let mt = &models[inp.model];
    let t = match &inp.source {
        InputSource::Tensor(n) => mt.read(n)?,
        InputSource::StackExperts(parts) => {
            let mut data = Vec::new();
            let mut dtype = None;
            for n in parts.iter().flatten() {
                let t = mt.read(n)?;
                dtype = Some(t.dtype);
                data.extend_from_slice(&t.data);
            }
            Tensor::new(inp.shape.clone(), data, dtype.unwrap_or(inp.dtype))
        }
    };
    if t.shape != inp.shape {
        return Err(Error::tensor(
            &task.name,
            format!("input from {} changed shape since planning", mt.label),
        ));
    }
    Ok(t.cast(task.working_dtype))
}

/// Computes one output tensor and returns its bytes in the output dtype.
pub fn compute_task(
    plan: &MergePlan,
    task: &TensorTask,
    models: &[ModelTensors],
) -> Result<Vec<u8>> {
    compute_rows(plan, task, models, None)
}

/// Whether `task` may be computed in row blocks: the method is row-separable
/// for these parameters and every input is a plain tensor of the output's
/// shape (no permutation, expert fusion, truncation or LoRA).
pub fn splittable(plan: &MergePlan, task: &TensorTask, models: &[ModelTensors]) -> bool {
    let Some(method) = methods::get(&plan.method) else {
        return false;
    };
    task.shape.len() >= 2
        && !task.permute
        && method.row_separable(&task.global, &task.per_model)
        && task.inputs.iter().all(|i| {
            i.shape == task.shape
                && matches!(i.source, InputSource::Tensor(_))
                && models[i.model].lora.is_none()
        })
}

/// Computes rows `rows` of one output tensor (all of it for `None`).
pub fn compute_rows(
    plan: &MergePlan,
    task: &TensorTask,
    models: &[ModelTensors],
    rows: Option<(usize, usize)>,
) -> Result<Vec<u8>> {
    let method = methods::get(&plan.method)
        .ok_or_else(|| Error::msg(format!("unknown method {}", plan.method)))?;
    let mut tensors = match rows {
        None => (0..task.inputs.len())
            .map(|i| load_input(task, i, models))
            .collect::<Result<Vec<_>>>()?,
        Some((r0, r1)) => task
            .inputs
            .iter()
            .map(|inp| match &inp.source {
                InputSource::Tensor(n) => Ok(models[inp.model]
                    .read_rows(n, r0, r1)?
                    .cast(task.working_dtype)),
                InputSource::StackExperts(_) => Err(Error::tensor(
                    &task.name,
                    "internal: row blocks of fused experts",
                )),
            })
            .collect::<Result<Vec<_>>>()?,
    };
    if task.permute {
        let p = &plan
            .tokenizer
            .as_ref()
            .ok_or_else(|| {
                Error::tensor(&task.name, "internal: permutation without a tokenizer plan")
            })?
            .permutation;
        let mut mats: std::collections::HashMap<usize, Tensor> = std::collections::HashMap::new();
        for (inp, t) in task.inputs.iter().zip(tensors.drain(..)) {
            mats.insert(inp.model, t);
        }
        tensors = task
            .inputs
            .iter()
            .map(|inp| {
                crate::tokenizer::permute(p, &task.vocab_defaults, inp.model, &mats, &task.name)
            })
            .collect::<Result<Vec<_>>>()?;
    }
    let job = MergeJob {
        name: &task.name,
        tensors,
        base: task.base,
        global: &task.global,
        per_model: task.per_model.iter().collect(),
        is_embed: task.is_embed,
        seed: plan.seed,
    };
    let out = method.merge(job)?;
    let want_shape = match rows {
        None => task.shape.clone(),
        Some((r0, r1)) => {
            let mut s = task.shape.clone();
            s[0] = r1 - r0;
            s
        }
    };
    if out.shape != want_shape {
        return Err(Error::tensor(
            &task.name,
            format!(
                "merge produced shape {:?}, planned {:?}",
                out.shape, want_shape
            ),
        ));
    }
    let out = out.cast(task.out_dtype);
    Ok(crate::dtype::encode_par(task.out_dtype, &out.data))
}

/// Target elements per block of a streamed merge: the smallest the
/// methods' partial sums allow ([`methods::BLOCK`]), so a thread's f32
/// buffers (inputs, task vectors, output: ~0.5 MB for a 3-model merge)
/// stay in L2 — 2-4 % less time than 64 Ki-element blocks in interleaved
/// runs on the 8-layer family.
pub const STREAM_BLOCK: usize = methods::BLOCK;

/// Whether `task` is merged streamed (in blocks, several passes when the
/// method needs whole-tensor statistics): the method streams this tensor
/// and every input is a plain tensor of the output's shape. `Some(align)`.
pub fn streamable(
    plan: &MergePlan,
    task: &TensorTask,
    models: &[ModelTensors],
    method: &dyn methods::MergeMethod,
) -> Option<usize> {
    let numel: usize = task.shape.iter().product();
    if task.permute
        || numel < 4 * methods::BLOCK
        || !task.inputs.iter().all(|i| {
            i.shape == task.shape
                && matches!(i.source, InputSource::Tensor(_))
                && models[i.model].lora.is_none()
        })
        || !small_reads_are_cheap(task, models)
    {
        return None;
    }
    if let Some(a) = method.stream_align(&task.shape, &task.global, &task.per_model) {
        return Some(a);
    }
    // row-separable methods stream through row blocks
    splittable(plan, task, models).then(|| task.shape[1..].iter().product::<usize>().max(1))
}

/// Whether every input of `task` lives where small reads are cheap (see
/// [`ByteSource::small_reads_are_cheap`]).
fn small_reads_are_cheap(task: &TensorTask, models: &[ModelTensors]) -> bool {
    task.inputs.iter().all(|i| {
        let m = &models[i.model];
        let InputSource::Tensor(n) = &i.source else {
            return true;
        };
        m.tensors
            .get(n)
            .and_then(|loc| m.shards.get(loc.shard))
            .is_none_or(|s| s.small_reads_are_cheap())
    })
}

/// Target elements per row block of a row-separable method.
const ROW_BLOCK: usize = 1 << 18;

/// Runs a row-separable task in row blocks (blocks in parallel), writing
/// each block as it finishes.
fn run_row_blocks(
    plan: &MergePlan,
    task: &TensorTask,
    models: &[ModelTensors],
    writer: &dyn TensorSink,
) -> Result<u64> {
    let rows = task.shape[0];
    let row_elems = task.shape[1..].iter().product::<usize>().max(1);
    let step = (ROW_BLOCK / row_elems).clamp(1, rows.max(1));
    let row_bytes = task.out_bytes() / rows.max(1) as u64;
    let written = std::sync::atomic::AtomicU64::new(0);
    (0..rows.div_ceil(step))
        .into_par_iter()
        .with_max_len(1)
        .try_for_each(|b| -> Result<()> {
            let r0 = b * step;
            let r1 = (r0 + step).min(rows);
            let out = compute_rows(plan, task, models, Some((r0, r1)))?;
            writer.write_part(task.shard, task.slot, r0 as u64 * row_bytes, &out)?;
            written.fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })?;
    Ok(written.into_inner())
}

/// Plain inputs read in element blocks, cast to the working dtype.
struct PlainInputs<'a> {
    inputs: Vec<(&'a dyn ByteSource, &'a TensorLoc)>,
    working: crate::dtype::DType,
}

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static WRITE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl methods::stream::BlockSource for PlainInputs<'_> {
    fn read(&self, i: usize, e0: usize, e1: usize, out: &mut Vec<f32>) -> Result<()> {
        let (src, loc) = self.inputs[i];
        let sz = loc.dtype.size();
        READ_BUF.with(|b| -> Result<()> {
            let mut b = b.borrow_mut();
            b.resize((e1 - e0) * sz, 0);
            src.read_at(loc.offset + (e0 * sz) as u64, &mut b)?;
            loc.dtype.decode(&b, out);
            Ok(())
        })?;
        crate::tensor::cast_slice(out, loc.dtype, self.working);
        Ok(())
    }

    fn read_delta_bf16(
        &self,
        i: usize,
        e0: usize,
        e1: usize,
        base: &[f32],
        out: &mut Vec<f32>,
    ) -> Result<bool> {
        use crate::dtype::DType;
        let (src, loc) = self.inputs[i];
        if loc.dtype != DType::BF16 || self.working != DType::BF16 || base.len() != e1 - e0 {
            return Ok(false);
        }
        READ_BUF.with(|b| -> Result<()> {
            let mut b = b.borrow_mut();
            b.resize((e1 - e0) * 2, 0);
            src.read_at(loc.offset + (e0 * 2) as u64, &mut b)?;
            // reused buffers keep their length: every element is written
            out.truncate(e1 - e0);
            out.resize(e1 - e0, 0.0);
            crate::simd::delta_bf16(&b, base, out);
            Ok(())
        })?;
        Ok(true)
    }
}

/// Runs one streamed task, writing output blocks as they finish.
fn run_streamed(
    plan: &MergePlan,
    task: &TensorTask,
    models: &[ModelTensors],
    method: &dyn methods::MergeMethod,
    writer: &dyn TensorSink,
) -> Result<u64> {
    let mut inputs = Vec::with_capacity(task.inputs.len());
    for inp in &task.inputs {
        let mt = &models[inp.model];
        let InputSource::Tensor(n) = &inp.source else {
            return Err(Error::tensor(
                &task.name,
                "internal: streamed fused experts",
            ));
        };
        let loc = mt
            .tensors
            .get(n)
            .ok_or_else(|| Error::tensor(n, format!("not present in model {}", mt.label)))?;
        if loc.shape != inp.shape {
            return Err(Error::tensor(
                &task.name,
                format!("input from {} changed shape since planning", mt.label),
            ));
        }
        inputs.push((mt.shards[loc.shard].as_ref(), loc));
    }
    let src = PlainInputs {
        inputs,
        working: task.working_dtype,
    };
    let out_dt = task.out_dtype;
    let written = std::sync::atomic::AtomicU64::new(0);
    let sink = Coalescer::new(&task.name, writer, task.shard, task.slot, task.out_bytes());
    // `vals` in the output dtype, to `f`
    let encoded = |vals: &[f32], f: &dyn Fn(&[u8]) -> Result<()>| -> Result<()> {
        WRITE_BUF.with(|b| {
            let mut b = b.borrow_mut();
            if out_dt == crate::dtype::DType::BF16 {
                // bf16 encoding rounds by itself; every byte is written, so
                // a reused buffer of the same length is not cleared first
                b.resize(vals.len() * 2, 0);
                crate::simd::encode_bf16(vals, &mut b);
            } else if out_dt == task.working_dtype {
                b.clear();
                out_dt.encode(vals, &mut b);
            } else {
                b.clear();
                let mut v = vals.to_vec();
                crate::tensor::cast_slice(&mut v, task.working_dtype, out_dt);
                out_dt.encode(&v, &mut b);
            }
            f(&b)
        })
    };
    let emit = |e0: usize, vals: &[f32]| -> Result<()> {
        if out_dt == crate::dtype::DType::BF16 {
            // straight into the output window, when the block lies in one
            let at = (e0 * 2) as u64;
            if sink.put_with(at, vals.len() * 2, |dst| {
                crate::simd::encode_bf16_uninit(vals, dst)
            })? {
                written.fetch_add(vals.len() as u64 * 2, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
        }
        encoded(vals, &|b: &[u8]| {
            written.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            sink.put((e0 * out_dt.size()) as u64, b)
        })
    };
    // a second emit of elements (every one emitted before): straight to
    // the writer, the window buffers being empty by then
    let again = |e0: usize, vals: &[f32]| -> Result<()> {
        encoded(vals, &|b: &[u8]| {
            sink.put_again((e0 * out_dt.size()) as u64, b)
        })
    };
    let job = methods::stream::StreamJob {
        name: &task.name,
        shape: &task.shape,
        dtype: task.working_dtype,
        n_inputs: task.inputs.len(),
        base: task.base,
        global: &task.global,
        per_model: task.per_model.iter().collect(),
        seed: plan.seed,
        block: STREAM_BLOCK,
        again: writer.rewrites().then_some(&again),
    };
    method.merge_streamed(job, &src, &emit)?;
    sink.finish()?;
    Ok(written.into_inner())
}

/// Output bytes of a window are written together (one `write_part`).
const COALESCE_WINDOW: u64 = 1 << 20;
/// Windows buffered at once, at most (a few per thread's front).
const COALESCE_OPEN: usize = 8;

/// Gathers a streamed tensor's output blocks (tens of KB each, finished by
/// several threads in any order) into aligned [`COALESCE_WINDOW`]-byte
/// windows and writes each window once it is complete: a few large writes
/// instead of many small ones (each write costs the file system a lock and
/// per-call block allocation). Every byte is put exactly once, so a window
/// is complete when its count of bytes reaches its size. When more than
/// [`COALESCE_OPEN`] windows hold buffers, the lowest one writes what it has
/// and passes its later bytes straight through.
struct Coalescer<'a> {
    name: &'a str,
    writer: &'a dyn TensorSink,
    shard: usize,
    slot: usize,
    total: u64,
    open: std::sync::Mutex<std::collections::BTreeMap<u64, Window>>,
}

#[derive(Default)]
struct Window {
    /// Bytes put so far (buffered or passed through).
    filled: u64,
    /// `None` once evicted: later bytes are written directly. Not cleared
    /// when made: only bytes put are ever read.
    buf: Option<Box<[std::mem::MaybeUninit<u8>]>>,
    /// Buffered pieces: (offset in the window, length).
    pieces: Vec<(u64, u64)>,
}

impl Window {
    /// Whether the buffered pieces cover the whole buffer, each byte once
    /// (sorts the pieces).
    fn tiled(&mut self) -> bool {
        let Some(buf) = self.buf.as_ref() else {
            return false;
        };
        self.pieces.sort_unstable();
        let end = self
            .pieces
            .iter()
            .try_fold(0u64, |at, (a, n)| (*a == at).then_some(at + n));
        end == Some(buf.len() as u64)
    }
}

impl<'a> Coalescer<'a> {
    fn new(
        name: &'a str,
        writer: &'a dyn TensorSink,
        shard: usize,
        slot: usize,
        total: u64,
    ) -> Self {
        Coalescer {
            name,
            writer,
            shard,
            slot,
            total,
            open: Default::default(),
        }
    }

    fn size_of(&self, k: u64) -> u64 {
        COALESCE_WINDOW.min(self.total - k * COALESCE_WINDOW)
    }

    /// Writes the buffered pieces of window `k`, merged into runs.
    fn write_runs(&self, k: u64, w: &mut Window) -> Result<()> {
        if w.buf.is_none() {
            return Ok(());
        }
        if w.tiled() {
            // complete and never evicted, so every byte is in the buffer:
            // hand it over
            let buf = w.buf.take().expect("buffer");
            w.pieces.clear();
            // SAFETY: the pieces put tile the whole window.
            let buf = unsafe { buf.assume_init() }.into_vec();
            return self
                .writer
                .write_part_owned(self.shard, self.slot, k * COALESCE_WINDOW, buf);
        }
        let buf = w.buf.as_ref().expect("buffer");
        let mut i = 0;
        while i < w.pieces.len() {
            let (a, mut b) = (w.pieces[i].0, w.pieces[i].0 + w.pieces[i].1);
            i += 1;
            while i < w.pieces.len() && w.pieces[i].0 == b {
                b += w.pieces[i].1;
                i += 1;
            }
            let run = &buf[a as usize..b as usize];
            // SAFETY: `a..b` is a run of pieces put, so every byte is set.
            let run = unsafe { std::slice::from_raw_parts(run.as_ptr().cast::<u8>(), run.len()) };
            self.writer
                .write_part(self.shard, self.slot, k * COALESCE_WINDOW + a, run)?;
        }
        w.pieces.clear();
        Ok(())
    }

    /// Puts `len` bytes at `offset` that `fill` writes (every one of them)
    /// straight into the buffer of their window, when they lie inside one
    /// buffered (or new) window and are not all of it; returns false,
    /// calling nothing, otherwise (the caller then uses [`Self::put`]).
    fn put_with(
        &self,
        offset: u64,
        len: usize,
        fill: impl FnOnce(&mut [std::mem::MaybeUninit<u8>]),
    ) -> Result<bool> {
        let k = offset / COALESCE_WINDOW;
        let in_w = offset - k * COALESCE_WINDOW;
        if offset + len as u64 > self.total
            || in_w + len as u64 > COALESCE_WINDOW
            || len as u64 == self.size_of(k)
        {
            return Ok(false);
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let buffered = open.values().filter(|w| w.buf.is_some()).count();
        match open.get(&k) {
            Some(w) if w.buf.is_none() => return Ok(false),
            None if buffered >= COALESCE_OPEN => return Ok(false),
            _ => {}
        }
        let size = self.size_of(k);
        let w = open.entry(k).or_insert_with(|| Window {
            buf: Some(Box::new_uninit_slice(size as usize)),
            ..Default::default()
        });
        let buf = w.buf.as_mut().expect("buffered window");
        fill(&mut buf[in_w as usize..in_w as usize + len]);
        w.pieces.push((in_w, len as u64));
        w.filled += len as u64;
        if w.filled >= size {
            let mut w = open.remove(&k).expect("window");
            drop(open);
            if !w.tiled() {
                return Err(Error::tensor(
                    self.name,
                    "internal: streamed output put some bytes twice",
                ));
            }
            self.write_runs(k, &mut w)?;
        }
        Ok(true)
    }

    /// Puts `bytes` at `offset` in the tensor's output.
    fn put(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        if offset + bytes.len() as u64 > self.total {
            return Err(Error::tensor(
                self.name,
                "internal: streamed output past the end of the tensor",
            ));
        }
        let mut at = 0usize;
        while at < bytes.len() {
            let off = offset + at as u64;
            let k = off / COALESCE_WINDOW;
            let in_w = off - k * COALESCE_WINDOW;
            let n = ((COALESCE_WINDOW - in_w) as usize).min(bytes.len() - at);
            let piece = &bytes[at..at + n];
            at += n;
            let size = self.size_of(k);
            // a whole window in one piece: no copy
            if in_w == 0 && n as u64 == size {
                self.writer.write_part(self.shard, self.slot, off, piece)?;
                continue;
            }
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let buffered = open.values().filter(|w| w.buf.is_some()).count();
            if !open.contains_key(&k) && buffered >= COALESCE_OPEN {
                // evict the lowest buffered window
                let low = open
                    .iter()
                    .find(|(_, w)| w.buf.is_some())
                    .map(|(kk, _)| *kk)
                    .expect("a buffered window");
                let w = open.get_mut(&low).expect("window");
                self.write_runs(low, w)?;
                w.buf = None;
            }
            let w = open.entry(k).or_insert_with(|| Window {
                buf: Some(Box::new_uninit_slice(size as usize)),
                ..Default::default()
            });
            w.filled += n as u64;
            match w.buf.as_mut() {
                Some(buf) => {
                    let dst = &mut buf[in_w as usize..in_w as usize + n];
                    // SAFETY: `dst` and `piece` are `n` bytes each, distinct
                    // allocations; MaybeUninit<u8> has u8's layout.
                    unsafe {
                        std::ptr::copy_nonoverlapping(piece.as_ptr(), dst.as_mut_ptr().cast(), n)
                    };
                    w.pieces.push((in_w, n as u64));
                }
                None => {
                    self.writer.write_part(self.shard, self.slot, off, piece)?;
                }
            }
            if w.filled >= size {
                let mut w = open.remove(&k).expect("window");
                drop(open);
                if w.buf.is_some() && !w.tiled() {
                    // as many bytes as the window holds, yet not all of it
                    return Err(Error::tensor(
                        self.name,
                        "internal: streamed output put some bytes twice",
                    ));
                }
                self.write_runs(k, &mut w)?;
            }
        }
        Ok(())
    }

    /// Puts `bytes` at `offset` a second time, once every byte of the
    /// tensor has been put (so no window is buffered): straight to the
    /// writer, which keeps the later bytes ([`TensorSink::rewrites`]).
    fn put_again(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        if offset + bytes.len() as u64 > self.total
            || !self
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        {
            return Err(Error::tensor(
                self.name,
                "internal: streamed output put again before it was complete",
            ));
        }
        self.writer.write_part(self.shard, self.slot, offset, bytes)
    }

    /// After every byte was put: writes anything still buffered (nothing,
    /// unless a method emitted fewer bytes than its tensor has).
    fn finish(&self) -> Result<()> {
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(|p| p.into_inner()));
        let incomplete = !open.is_empty();
        for (k, mut w) in open {
            self.write_runs(k, &mut w)?;
        }
        if incomplete {
            return Err(Error::tensor(
                self.name,
                "internal: the streamed output has gaps",
            ));
        }
        Ok(())
    }
}

/// Progress callback: (tensors done, tensors total, bytes written).
pub type Progress<'a> = &'a (dyn Fn(usize, usize, u64) + Sync);

/// Runs the tasks `which` (indices into `plan.tensors`) writing into `writer`.
pub fn run_tasks(
    plan: &MergePlan,
    which: &[usize],
    models: &[ModelTensors],
    writer: &dyn TensorSink,
    memory_budget: u64,
    progress: Progress,
) -> Result<()> {
    // Chaos switch for robustness tests: stall forever after N tensors, so a
    // test can kill the process mid-write deterministically.
    let stall_after: Option<usize> = std::env::var("SMELT_CHAOS_STALL_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    // Chaos switch: sleep this long after each tensor (slow-worker tests).
    let delay_ms: Option<u64> = std::env::var("SMELT_CHAOS_TENSOR_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let bytes = std::sync::atomic::AtomicU64::new(0);
    let total = which.len();
    // Work units: whole tensors, or row blocks of tensors too large for the
    // budget (when the method allows it). A tensor counts as done when its
    // last block is written.
    let threads = rayon::current_num_threads().max(1) as u64;
    let per_unit = (memory_budget / threads).max(1);
    // (task index, row range, estimated working bytes)
    type Unit = (usize, Option<(usize, usize)>, u64);
    let mut units: Vec<Unit> = Vec::new();
    let mut blocks_left: std::collections::HashMap<usize, std::sync::atomic::AtomicUsize> =
        Default::default();
    let method = methods::get(&plan.method)
        .ok_or_else(|| Error::msg(format!("unknown method {}", plan.method)))?;
    let mut streamed: Vec<usize> = Vec::new();
    for &i in which {
        let t = &plan.tensors[i];
        if streamable(plan, t, models, method.as_ref()).is_some() {
            streamed.push(i);
            continue;
        }
        let wb = t.working_bytes();
        if wb > per_unit && splittable(plan, t, models) {
            let rows = t.shape[0];
            let row_bytes = (wb / rows as u64).max(1);
            let step = ((per_unit / row_bytes) as usize).clamp(1, rows);
            let n = rows.div_ceil(step);
            blocks_left.insert(i, std::sync::atomic::AtomicUsize::new(n));
            for b in 0..n {
                let r0 = b * step;
                let r1 = (r0 + step).min(rows);
                units.push((i, Some((r0, r1)), row_bytes * (r1 - r0) as u64));
            }
        } else {
            units.push((i, None, wb));
        }
    }
    let tensor_done = |b: u64| {
        let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress(d, total, b);
        if let Some(ms) = delay_ms {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        if stall_after == Some(d) {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    };
    let mut start = 0;
    while start < units.len() {
        let mut end = start;
        let mut budget = 0u64;
        while end < units.len() {
            let b = units[end].2;
            if end > start && budget + b > memory_budget {
                break;
            }
            budget += b;
            end += 1;
        }
        units[start..end]
            .par_iter()
            .try_for_each(|&(i, rows, _)| -> Result<()> {
                let task = &plan.tensors[i];
                let out = compute_rows(plan, task, models, rows)?;
                match rows {
                    None => writer.write(task.shard, task.slot, &out)?,
                    Some((r0, _)) => {
                        let row_bytes = task.out_bytes() / task.shape[0] as u64;
                        writer.write_part(task.shard, task.slot, r0 as u64 * row_bytes, &out)?
                    }
                }
                let b = bytes.fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed)
                    + out.len() as u64;
                let finished = match blocks_left.get(&i) {
                    Some(left) => left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1,
                    None => true,
                };
                if finished {
                    tensor_done(b);
                }
                Ok(())
            })?;
        start = end;
    }
    // streamed tensors: blocks in parallel, and one tensor in flight per
    // pool thread, so that a thread done with its share of one tensor's pass
    // takes blocks of another instead of waiting for the pass to end (while
    // at most that many tensors hold their per-tensor state)
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    let lanes = (threads as usize).min(streamed.len());
    rayon::scope(|sc| {
        for _ in 0..lanes {
            sc.spawn(|_| {
                loop {
                    let q = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = streamed.get(q) else {
                        return;
                    };
                    let task = &plan.tensors[i];
                    let r = if method
                        .stream_align(&task.shape, &task.global, &task.per_model)
                        .is_some()
                    {
                        run_streamed(plan, task, models, method.as_ref(), writer)
                    } else {
                        run_row_blocks(plan, task, models, writer)
                    };
                    match r {
                        Ok(n) => {
                            let b = bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                            tensor_done(b);
                        }
                        Err(e) => {
                            // the others stop taking tensors
                            next.store(streamed.len(), std::sync::atomic::Ordering::Relaxed);
                            failed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every `write_part` into one buffer.
    struct Record {
        bytes: Mutex<(Vec<u8>, Vec<bool>, usize)>,
    }

    impl TensorSink for Record {
        fn write(&self, _: usize, _: usize, _: &[u8]) -> Result<()> {
            unreachable!("streamed output is written in parts")
        }
        fn write_part(&self, _: usize, _: usize, off: u64, b: &[u8]) -> Result<()> {
            let mut g = self.bytes.lock().unwrap();
            g.2 += 1;
            for (i, x) in b.iter().enumerate() {
                let at = off as usize + i;
                assert!(!g.1[at], "byte {at} written twice");
                g.1[at] = true;
                g.0[at] = *x;
            }
            Ok(())
        }
    }

    /// Blocks put in any order, from several threads, of sizes that do and
    /// do not divide the window, land at their offsets, each byte once, in
    /// few writes; more fronts than buffered windows still give every byte.
    #[test]
    fn coalescer_writes_every_byte_once_in_few_writes() {
        let rng = crate::rng::Stream::new(3, "coalesce", "t");
        for (total, block, fronts) in [
            (5 * COALESCE_WINDOW + 12_345, 65_536usize, 2usize),
            (3 * COALESCE_WINDOW, 3 * COALESCE_WINDOW as usize, 1),
            (40 * COALESCE_WINDOW + 7, 100_003, 2),
            (40 * COALESCE_WINDOW + 7, 100_003, 24),
        ] {
            let want: Vec<u8> = (0..total).map(|i| (rng.bits(i) >> 7) as u8).collect();
            let rec = Record {
                bytes: Mutex::new((vec![0; total as usize], vec![false; total as usize], 0)),
            };
            let c = Coalescer::new("t", &rec, 0, 0, total);
            // `fronts` interleaved ascending sequences of blocks, as
            // threads working on their own ranges produce them
            let nb = (total as usize).div_ceil(block);
            let per = nb.div_ceil(fronts);
            let mut order = Vec::new();
            for step in 0..per {
                for f in 0..fronts {
                    let b = f * per + step;
                    if b < nb {
                        order.push(b);
                    }
                }
            }
            assert_eq!(order.len(), nb);
            std::thread::scope(|s| {
                for part in order.chunks(order.len().div_ceil(2)) {
                    let (c, want) = (&c, &want);
                    s.spawn(move || {
                        for &b in part {
                            let a = b * block;
                            let e = (a + block).min(total as usize);
                            // odd blocks filled in place where they can be
                            let src = &want[a..e];
                            let placed = b % 2 == 1
                                && c.put_with(a as u64, e - a, |dst| {
                                    for (d, x) in dst.iter_mut().zip(src) {
                                        d.write(*x);
                                    }
                                })
                                .unwrap();
                            if !placed {
                                c.put(a as u64, src).unwrap();
                            }
                        }
                    });
                }
            });
            c.finish().unwrap();
            let g = rec.bytes.lock().unwrap();
            assert!(g.1.iter().all(|x| *x), "every byte written");
            assert!(g.0 == want, "bytes at their offsets");
            if fronts <= 2 {
                // about one write per window (plus split runs at fronts)
                let windows = total.div_ceil(COALESCE_WINDOW) as usize;
                assert!(
                    g.2 <= windows + 4 * fronts,
                    "{} writes for {windows} windows",
                    g.2
                );
            }
        }
    }

    /// Bytes put again (a speculative method's corrected blocks) are
    /// refused while the tensor is incomplete, and land over the first
    /// ones once it is complete.
    #[test]
    fn coalescer_puts_again_once_complete() {
        struct Overwrite(Mutex<Vec<u8>>);
        impl TensorSink for Overwrite {
            fn write(&self, _: usize, _: usize, _: &[u8]) -> Result<()> {
                unreachable!("streamed output is written in parts")
            }
            fn write_part(&self, _: usize, _: usize, off: u64, b: &[u8]) -> Result<()> {
                self.0.lock().unwrap()[off as usize..off as usize + b.len()].copy_from_slice(b);
                Ok(())
            }
        }
        let sink = Overwrite(Mutex::new(vec![0; 300]));
        let c = Coalescer::new("model.z", &sink, 0, 0, 300);
        c.put(0, &[1; 200]).unwrap();
        let e = c.put_again(50, &[2; 10]).unwrap_err().to_string();
        assert!(
            e.contains("model.z") && e.contains("before it was complete"),
            "{e}"
        );
        c.put(200, &[1; 100]).unwrap();
        c.put_again(50, &[2; 10]).unwrap();
        let e = c.put_again(295, &[2; 10]).unwrap_err().to_string();
        assert!(e.contains("model.z"), "{e}");
        c.finish().unwrap();
        let g = sink.0.lock().unwrap();
        assert!(g[..50].iter().all(|x| *x == 1) && g[50..60].iter().all(|x| *x == 2));
        assert!(g[60..].iter().all(|x| *x == 1));
    }

    /// A tensor whose bytes were not all put is an error, not a silent gap.
    #[test]
    fn coalescer_reports_gaps_and_overruns() {
        let rec = Record {
            bytes: Mutex::new((vec![0; 100], vec![false; 100], 0)),
        };
        let c = Coalescer::new("model.x", &rec, 0, 0, 100);
        c.put(0, &[1; 50]).unwrap();
        let e = c.put(60, &[1; 50]).unwrap_err().to_string();
        assert!(e.contains("model.x") && e.contains("past the end"), "{e}");
        let e = c.finish().unwrap_err().to_string();
        assert!(e.contains("model.x") && e.contains("gaps"), "{e}");
        // what was put is still written
        assert!(rec.bytes.lock().unwrap().1[..50].iter().all(|x| *x));
        // bytes put twice fill the count but leave a gap: an error, and
        // only bytes put are written
        let rec = Record {
            bytes: Mutex::new((vec![0; 100], vec![false; 100], 0)),
        };
        for in_place in [false, true] {
            let c = Coalescer::new("model.y", &rec, 0, 0, 100);
            c.put(0, &[1; 60]).unwrap();
            let e = if in_place {
                c.put_with(30, 40, |d| d.iter_mut().for_each(|x| _ = x.write(2)))
                    .map(|_| ())
            } else {
                c.put(30, &[2; 40])
            };
            let e = e.unwrap_err().to_string();
            assert!(e.contains("model.y") && e.contains("twice"), "{e}");
            assert!(rec.bytes.lock().unwrap().1.iter().all(|x| !*x));
            // past the end: declined, nothing called
            assert!(!c.put_with(90, 20, |_| unreachable!()).unwrap());
        }
    }
}
