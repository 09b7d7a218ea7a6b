//! Reading safetensors checkpoints: single files or sharded with an index
//! (spec §5.2). Headers are parsed and validated up front (dtype, shape vs
//! byte length, offsets inside the file, no overlaps), so a bad file is
//! reported before any tensor data is read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::location::{LocalDir, ModelLocation};
use crate::io::source::ByteSource;
use crate::tensor::Tensor;

/// Largest header smelt accepts (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Where one tensor's bytes live.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]

pub struct TensorLoc {
    pub shard: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset in the shard file.
    pub offset: u64,
    pub nbytes: u64,
}

/// Parses and validates one safetensors header. Returns tensor name → loc
/// (with `shard` set to `shard_idx`).
pub fn read_header(src: &dyn ByteSource, shard_idx: usize) -> Result<BTreeMap<String, TensorLoc>> {
    let file = src.name();
    let len = src.len();
    if len < 8 {
        return Err(Error::format(
            &file,
            format!("not a safetensors file: only {len} bytes"),
        ));
    }
    let mut n8 = [0u8; 8];
    src.read_at(0, &mut n8)?;
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER {
        return Err(Error::format(
            &file,
            format!("header length {n} is implausibly large"),
        ));
    }
    if 8 + n > len {
        return Err(Error::format(
            &file,
            format!(
                "header length {n} runs past the end of the file ({len} bytes): truncated file?"
            ),
        ));
    }
    let mut hb = vec![0u8; n as usize];
    src.read_at(8, &mut hb)?;
    let header: Value = serde_json::from_slice(&hb)
        .map_err(|e| Error::format(&file, format!("header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| Error::format(&file, "header is not a JSON object"))?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let mut out = BTreeMap::new();
    let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |msg: String| Error::format(&file, format!("tensor {name}: {msg}"));
        let dt_s = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("missing dtype".into()))?;
        let dtype =
            DType::from_safetensors(dt_s).ok_or_else(|| bad(format!("unknown dtype {dt_s:?}")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing shape".into()))?
            .iter()
            .map(|d| d.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("shape entries must be non-negative integers".into()))?;
        let offs = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("missing data_offsets [start, end]".into()))?;
        let (a, b) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(a), Some(b)) if a <= b => (a, b),
            _ => {
                return Err(bad(
                    "data_offsets must be [start, end] with start <= end".into()
                ));
            }
        };
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d as u64))
            .ok_or_else(|| bad("shape overflows".into()))?;
        let want = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| bad("shape overflows".into()))?;
        if b - a != want {
            return Err(bad(format!(
                "shape {shape:?} of {dt_s} needs {want} bytes but data_offsets span {}",
                b - a
            )));
        }
        if b > data_len {
            return Err(bad(format!(
                "data_offsets end {b} is past the end of the data section ({data_len} bytes): truncated file?"
            )));
        }
        ranges.push((a, b, name));
        out.insert(
            name.clone(),
            TensorLoc {
                shard: shard_idx,
                dtype,
                shape,
                offset: data_start + a,
                nbytes: b - a,
            },
        );
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::format(
                &file,
                format!(
                    "tensors {} and {} overlap in the data section",
                    w[0].2, w[1].2
                ),
            ));
        }
    }
    Ok(out)
}

type HeaderReader = fn(&dyn ByteSource, usize) -> Result<BTreeMap<String, TensorLoc>>;

/// Every tensor of one model, across its shards.
#[derive(Debug, Clone)]
pub struct ModelTensors {
    /// The model as the user wrote it (for messages).
    pub label: String,
    pub shards: Vec<Arc<dyn ByteSource>>,
    pub tensors: BTreeMap<String, TensorLoc>,
    /// A LoRA adapter applied to tensors as they are read.
    pub lora: Option<Arc<crate::lora::LoraAdapter>>,
}

impl ModelTensors {
    /// Opens a model directory: `model.safetensors` or
    /// `model.safetensors.index.json` (spec §5.2).
    pub fn open_dir(dir: &Path, label: &str) -> Result<ModelTensors> {
        Self::open(&LocalDir::new(dir), label)
    }

    /// Opens a model folder (local directory or object-store prefix):
    /// `model.safetensors` or `model.safetensors.index.json` (spec §5.2),
    /// else the same for `pytorch_model.bin`.
    pub fn open(loc: &dyn ModelLocation, label: &str) -> Result<ModelTensors> {
        // mergekit's probe order: safetensors (single or indexed), then .bin
        for (single, reader) in [
            ("model.safetensors", read_header as HeaderReader),
            (
                "pytorch_model.bin",
                crate::io::pickle::read_bin_index as HeaderReader,
            ),
        ] {
            let index = format!("{single}.index.json");
            if loc.exists(&index)? {
                return Self::open_indexed(loc, &index, label, reader);
            }
            if loc.exists(single)? {
                let src: Arc<dyn ByteSource> = loc.open(single)?;
                let tensors = reader(src.as_ref(), 0)?;
                return Ok(ModelTensors {
                    label: label.to_string(),
                    shards: vec![src],
                    tensors,
                    lora: None,
                });
            }
        }
        Err(Error::format(
            loc.display(),
            "no model files: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json",
        ))
    }

    fn open_indexed(
        loc: &dyn ModelLocation,
        index_name: &str,
        label: &str,
        reader: HeaderReader,
    ) -> Result<ModelTensors> {
        let index = loc.file_display(index_name);
        let text = loc.read_to_string(index_name)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
        let wm = v
            .get("weight_map")
            .and_then(|w| w.as_object())
            .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
        let mut files: BTreeSet<String> = BTreeSet::new();
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for (t, f) in wm {
            let f = f.as_str().ok_or_else(|| {
                Error::format(&index, format!("weight_map[{t}] is not a file name"))
            })?;
            if f.contains('/') || f.contains("..") {
                return Err(Error::format(
                    &index,
                    format!("weight_map[{t}] = {f:?} is not a plain file name"),
                ));
            }
            files.insert(f.to_string());
            map.insert(t.clone(), f.to_string());
        }
        // headers are read in parallel (object stores: one round trip per
        // shard at a time would dominate planning); errors are reported in
        // file order, as a sequential read would
        let files: Vec<&String> = files.iter().collect();
        let opened: Vec<Result<OpenedShard>> = files
            .par_iter()
            .enumerate()
            .map(|(k, f)| {
                if !loc.exists(f)? {
                    return Err(Error::format(
                        &index,
                        format!("names shard {f}, which does not exist in {}", loc.display()),
                    ));
                }
                let src: Arc<dyn ByteSource> = loc.open(f)?;
                let h = reader(src.as_ref(), k)?;
                Ok((src, h))
            })
            .collect();
        let mut shards: Vec<Arc<dyn ByteSource>> = Vec::new();
        let mut headers: BTreeMap<String, BTreeMap<String, TensorLoc>> = BTreeMap::new();
        for (f, r) in files.into_iter().zip(opened) {
            let (src, h) = r?;
            headers.insert(f.clone(), h);
            shards.push(src);
        }
        let mut tensors = BTreeMap::new();
        for (t, f) in map {
            let loc = headers[&f].get(&t).ok_or_else(|| {
                Error::format(
                    &index,
                    format!("lists tensor {t} in shard {f}, but {f} does not contain it"),
                )
            })?;
            tensors.insert(t, loc.clone());
        }
        Ok(ModelTensors {
            label: label.to_string(),
            shards,
            tensors,
            lora: None,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Reads one tensor's raw bytes.
    pub fn read_raw(&self, name: &str) -> Result<(TensorLoc, Vec<u8>)> {
        let loc = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(name, format!("not present in model {}", self.label)))?;
        let mut buf = vec![0u8; loc.nbytes as usize];
        self.shards[loc.shard].read_at(loc.offset, &mut buf)?;
        Ok((loc.clone(), buf))
    }

    /// Reads rows `r0..r1` (along axis 0) of a tensor, decoded to f32; the
    /// LoRA adapter, if any, is not applied (callers do not split those).
    pub fn read_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Tensor> {
        let loc = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(name, format!("not present in model {}", self.label)))?;
        let rows = loc.shape.first().copied().unwrap_or(1);
        if r0 > r1 || r1 > rows {
            return Err(Error::tensor(
                name,
                format!("row range {r0}..{r1} outside {rows} rows"),
            ));
        }
        let row_bytes = loc.nbytes / rows.max(1) as u64;
        let mut buf = vec![0u8; ((r1 - r0) as u64 * row_bytes) as usize];
        self.shards[loc.shard].read_at(loc.offset + r0 as u64 * row_bytes, &mut buf)?;
        let mut shape = loc.shape.clone();
        shape[0] = r1 - r0;
        Ok(Tensor::new(
            shape,
            crate::dtype::decode_par(loc.dtype, &buf),
            loc.dtype,
        ))
    }

    /// Reads one tensor, decoded to f32 values in its own dtype.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let (loc, buf) = self.read_raw(name)?;
        let data = crate::dtype::decode_par(loc.dtype, &buf);
        let t = Tensor::new(loc.shape, data, loc.dtype);
        match &self.lora {
            Some(l) => l.apply(name, t),
            None => Ok(t),
        }
    }
}

/// One opened shard file: its bytes and its tensor table.
type OpenedShard = (Arc<dyn ByteSource>, BTreeMap<String, TensorLoc>);
