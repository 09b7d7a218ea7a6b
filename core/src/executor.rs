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
        for inp in &task.extra_inputs {
            mats.insert(inp.model, read_input(task, inp, models)?);
        }
        tensors = task
            .inputs
            .iter()
            .map(|inp| crate::tokenizer::permute(p, inp.model, &mats, &task.name))
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
    let emit = |e0: usize, vals: &[f32]| -> Result<()> {
        WRITE_BUF.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            if out_dt == task.working_dtype || out_dt == crate::dtype::DType::BF16 {
                // bf16 encoding rounds by itself
                out_dt.encode(vals, &mut b);
            } else {
                let mut v = vals.to_vec();
                crate::tensor::cast_slice(&mut v, task.working_dtype, out_dt);
                out_dt.encode(&v, &mut b);
            }
            written.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            writer.write_part(task.shard, task.slot, (e0 * out_dt.size()) as u64, &b)
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
    };
    method.merge_streamed(job, &src, &emit)?;
    Ok(written.into_inner())
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
    // streamed tensors: one at a time, blocks in parallel
    for &i in &streamed {
        let task = &plan.tensors[i];
        let n = if method
            .stream_align(&task.shape, &task.global, &task.per_model)
            .is_some()
        {
            run_streamed(plan, task, models, method.as_ref(), writer)?
        } else {
            run_row_blocks(plan, task, models, writer)?
        };
        let b = bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        tensor_done(b);
    }
    Ok(())
}
