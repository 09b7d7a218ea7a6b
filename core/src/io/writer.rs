//! Writing safetensors shards whose layout is fixed by the plan.
//!
//! Every shard's header is known before any tensor is computed (names,
//! dtypes, shapes, offsets come from the plan), so each shard file is created
//! at its final size with its header written, and tensors are written at
//! their offsets in whatever order they finish. The bytes of the result do
//! not depend on completion order or thread count.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// One tensor's slot in a shard.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlotSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl SlotSpec {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Builds a safetensors header (padded to a multiple of 8 with spaces) and
/// returns it with each tensor's absolute data offset.
pub fn build_header(slots: &[SlotSpec]) -> (Vec<u8>, Vec<u64>) {
    let mut m = Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut rel = Vec::with_capacity(slots.len());
    let mut off = 0u64;
    for s in slots {
        let n = s.nbytes();
        m.insert(
            s.name.clone(),
            json!({"dtype": s.dtype.safetensors_name(), "shape": s.shape, "data_offsets": [off, off + n]}),
        );
        rel.push(off);
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(m)).expect("header serialises");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + h.len());
    bytes.extend_from_slice(&(h.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&h);
    let base = bytes.len() as u64;
    (bytes, rel.into_iter().map(|r| r + base).collect())
}

/// Bytes written to a shard between two [`start_writeback`] calls on it:
/// one call (and one batch of block I/O, submitted by the calling thread)
/// per few MB instead of one per streamed 64 KB block.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts writing a file's dirty pages back to disk (asynchronously), so
/// the final fsync finds little left to do and the disk works while the
/// merge computes. Advisory: failures are ignored (fsync reports them).
/// `len` 0: to the end of the file.
fn start_writeback(f: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
}

/// Shard files under construction in one directory.
#[derive(Debug)]
pub struct ShardWriter {
    files: Vec<(PathBuf, File, Vec<u64>, Vec<SlotSpec>)>,
    /// Bytes written so far, per shard (see [`WRITEBACK_EVERY`]).
    written: Vec<std::sync::atomic::AtomicU64>,
}

impl ShardWriter {
    /// Creates every shard file (`names[i]` in `dir`) with its header.
    pub fn create(dir: &Path, shards: &[(String, Vec<SlotSpec>)]) -> Result<ShardWriter> {
        let mut files = Vec::new();
        for (name, slots) in shards {
            let path = dir.join(name);
            let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
            let (header, offsets) = build_header(slots);
            let total = header.len() as u64 + slots.iter().map(|s| s.nbytes()).sum::<u64>();
            f.set_len(total).map_err(|e| Error::io(&path, e))?;
            f.write_all_at(&header, 0)
                .map_err(|e| Error::io(&path, e))?;
            files.push((path, f, offsets, slots.clone()));
        }
        let written = files.iter().map(|_| Default::default()).collect();
        Ok(ShardWriter { files, written })
    }

    /// Writes one tensor's bytes into its slot.
    pub fn write(&self, shard: usize, slot: usize, bytes: &[u8]) -> Result<()> {
        let (path, f, offsets, slots) = &self.files[shard];
        let want = slots[slot].nbytes();
        if bytes.len() as u64 != want {
            return Err(Error::tensor(
                &slots[slot].name,
                format!("internal: {} bytes for a slot of {want}", bytes.len()),
            ));
        }
        f.write_all_at(bytes, offsets[slot])
            .map_err(|e| Error::io(path, e))?;
        self.wrote(shard, bytes.len() as u64);
        Ok(())
    }

    /// Writes part of a tensor's bytes, `byte_offset` bytes into its slot.
    pub fn write_part(
        &self,
        shard: usize,
        slot: usize,
        byte_offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let (path, f, offsets, slots) = &self.files[shard];
        if byte_offset + bytes.len() as u64 > slots[slot].nbytes() {
            return Err(Error::tensor(
                &slots[slot].name,
                "internal: partial write past the end of its slot",
            ));
        }
        f.write_all_at(bytes, offsets[slot] + byte_offset)
            .map_err(|e| Error::io(path, e))?;
        self.wrote(shard, bytes.len() as u64);
        Ok(())
    }

    /// Counts `len` bytes written to `shard`; the write that crosses a
    /// multiple of [`WRITEBACK_EVERY`] starts writeback of the whole file.
    fn wrote(&self, shard: usize, len: u64) {
        use std::sync::atomic::Ordering;
        let before = self.written[shard].fetch_add(len, Ordering::Relaxed);
        if (before + len) / WRITEBACK_EVERY != before / WRITEBACK_EVERY {
            start_writeback(&self.files[shard].1, 0, 0);
        }
    }

    /// Flushes every shard to stable storage.
    pub fn finish(self) -> Result<()> {
        for (path, f, _, _) in self.files {
            f.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}
