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
fn start_writeback(f: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                0,
                0, // to the end of the file
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

/// Queued bytes per shard beyond which a writer waits instead of queueing.
const QUEUE_MAX: usize = 8 << 20;

/// A shard's writes in flight: one thread at a time writes (the file
/// system serialises writes to a file on its inode lock anyway, and a
/// second writer would spin there); others queue their bytes and go back
/// to computing, and the writing thread drains the queue before it leaves.
#[derive(Debug, Default)]
struct Pending {
    busy: bool,
    items: std::collections::VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// The first failed write (reported once), and whether one failed.
    err: Option<std::io::Error>,
    failed: bool,
}

/// Shard files under construction in one directory.
#[derive(Debug)]
pub struct ShardWriter {
    files: Vec<(PathBuf, File, Vec<u64>, Vec<SlotSpec>)>,
    /// Bytes written so far, per shard (see [`WRITEBACK_EVERY`]).
    written: Vec<std::sync::atomic::AtomicU64>,
    pending: Vec<(std::sync::Mutex<Pending>, std::sync::Condvar)>,
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
        let pending = files.iter().map(|_| Default::default()).collect();
        Ok(ShardWriter {
            files,
            written,
            pending,
        })
    }

    /// Writes `data` at absolute offset `at` of shard `shard`, or queues it
    /// when another thread is writing to that shard (see [`Pending`]).
    fn submit(&self, shard: usize, at: u64, data: std::borrow::Cow<'_, [u8]>) -> Result<()> {
        let (path, f, _, _) = &self.files[shard];
        let (m, cv) = &self.pending[shard];
        let lock = || m.lock().unwrap_or_else(|p| p.into_inner());
        let mut q = lock();
        if q.busy {
            while q.busy && q.bytes >= QUEUE_MAX && !q.failed {
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        }
        if q.failed {
            return Err(Self::failure(path, &mut q));
        }
        if q.busy {
            q.bytes += data.len();
            q.items.push_back((at, data.into_owned()));
            return Ok(());
        }
        q.busy = true;
        drop(q);
        let (mut at, mut data) = (at, data);
        loop {
            let r = f.write_all_at(&data, at);
            if r.is_ok() {
                self.wrote(shard, data.len() as u64);
            }
            let mut q = lock();
            if let Err(e) = r {
                q.failed = true;
                q.err.get_or_insert(e);
                q.items.clear();
                q.bytes = 0;
                q.busy = false;
                cv.notify_all();
                return Err(Self::failure(path, &mut q));
            }
            match q.items.pop_front() {
                Some((a, d)) => {
                    q.bytes -= d.len();
                    cv.notify_all();
                    (at, data) = (a, std::borrow::Cow::Owned(d));
                }
                None => {
                    q.busy = false;
                    cv.notify_all();
                    return Ok(());
                }
            }
        }
    }

    /// The error of a failed write to `path` (the first caller gets the
    /// file system's error).
    fn failure(path: &Path, q: &mut Pending) -> Error {
        let e = q
            .err
            .take()
            .unwrap_or_else(|| std::io::Error::other("an earlier write to this file failed"));
        Error::io(path, e)
    }

    /// Writes one tensor's bytes into its slot.
    pub fn write(&self, shard: usize, slot: usize, bytes: &[u8]) -> Result<()> {
        let (_, _, offsets, slots) = &self.files[shard];
        let want = slots[slot].nbytes();
        if bytes.len() as u64 != want {
            return Err(Error::tensor(
                &slots[slot].name,
                format!("internal: {} bytes for a slot of {want}", bytes.len()),
            ));
        }
        self.submit(shard, offsets[slot], bytes.into())
    }

    /// Writes part of a tensor's bytes, `byte_offset` bytes into its slot.
    pub fn write_part(
        &self,
        shard: usize,
        slot: usize,
        byte_offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        self.write_part_cow(shard, slot, byte_offset, bytes.into())
    }

    /// [`ShardWriter::write_part`] taking the bytes (queued without a copy
    /// when another thread is writing).
    pub fn write_part_owned(
        &self,
        shard: usize,
        slot: usize,
        byte_offset: u64,
        bytes: Vec<u8>,
    ) -> Result<()> {
        self.write_part_cow(shard, slot, byte_offset, bytes.into())
    }

    fn write_part_cow(
        &self,
        shard: usize,
        slot: usize,
        byte_offset: u64,
        bytes: std::borrow::Cow<'_, [u8]>,
    ) -> Result<()> {
        let (_, _, offsets, slots) = &self.files[shard];
        if byte_offset + bytes.len() as u64 > slots[slot].nbytes() {
            return Err(Error::tensor(
                &slots[slot].name,
                "internal: partial write past the end of its slot",
            ));
        }
        self.submit(shard, offsets[slot] + byte_offset, bytes)
    }

    /// Counts `len` bytes written to `shard`; the write that crosses a
    /// multiple of [`WRITEBACK_EVERY`] starts writeback of the whole file.
    fn wrote(&self, shard: usize, len: u64) {
        use std::sync::atomic::Ordering;
        let before = self.written[shard].fetch_add(len, Ordering::Relaxed);
        if (before + len) / WRITEBACK_EVERY != before / WRITEBACK_EVERY {
            start_writeback(&self.files[shard].1);
        }
    }

    /// Flushes every shard to stable storage.
    pub fn finish(self) -> Result<()> {
        for (i, (path, f, _, _)) in self.files.iter().enumerate() {
            // every write has returned by now; a queue is drained by the
            // thread that was writing before that thread returned
            let (m, cv) = &self.pending[i];
            let mut q = m.lock().unwrap_or_else(|p| p.into_inner());
            while q.busy {
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.failed {
                return Err(Self::failure(path, &mut q));
            }
            drop(q);
            f.sync_all().map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts written from several threads at once (some queued behind the
    /// writing thread, owned or borrowed) all land at their offsets.
    #[test]
    fn concurrent_parts_land_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 << 20;
        let slots = vec![
            SlotSpec {
                name: "a".into(),
                dtype: DType::BF16,
                shape: vec![n / 2],
            },
            SlotSpec {
                name: "b".into(),
                dtype: DType::F32,
                shape: vec![1000],
            },
        ];
        let w = ShardWriter::create(dir.path(), &[("model.safetensors".into(), slots)]).unwrap();
        let s = crate::rng::Stream::new(2, "writer", "t");
        let want: Vec<u8> = (0..n as u64).map(|i| (s.bits(i) >> 9) as u8).collect();
        let part = 12_345;
        let parts: Vec<usize> = (0..n.div_ceil(part)).collect();
        std::thread::scope(|sc| {
            for t in 0..4 {
                let (w, want, parts) = (&w, &want, &parts);
                sc.spawn(move || {
                    for &p in parts.iter().skip(t).step_by(4) {
                        let (a, b) = (p * part, ((p + 1) * part).min(n));
                        if p % 2 == 0 {
                            w.write_part(0, 0, a as u64, &want[a..b]).unwrap();
                        } else {
                            w.write_part_owned(0, 0, a as u64, want[a..b].to_vec())
                                .unwrap();
                        }
                    }
                });
            }
        });
        w.write(0, 1, &[7u8; 4000]).unwrap();
        let e = w.write_part(0, 1, 3999, &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("b") && e.contains("past the end"), "{e}");
        w.finish().unwrap();
        let m = crate::io::ModelTensors::open_dir(dir.path(), "t").unwrap();
        let got = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let loc = m.tensors.get("a").unwrap();
        assert!(got[loc.offset as usize..loc.offset as usize + n] == want[..]);
        let loc = m.tensors.get("b").unwrap();
        assert!(
            got[loc.offset as usize..loc.offset as usize + 4000]
                .iter()
                .all(|x| *x == 7)
        );
    }

    /// A failed write names the file, later writes fail too, and `finish`
    /// reports the failure instead of syncing a file with a hole.
    #[test]
    fn failed_writes_name_the_file_and_stick() {
        let dir = tempfile::tempdir().unwrap();
        let slots = vec![SlotSpec {
            name: "a".into(),
            dtype: DType::F32,
            shape: vec![1 << 16],
        }];
        let mut w =
            ShardWriter::create(dir.path(), &[("model.safetensors".into(), slots)]).unwrap();
        // a read-only handle: every write fails (EBADF)
        w.files[0].1 = File::open(dir.path().join("model.safetensors")).unwrap();
        let e = w.write_part(0, 0, 0, &[1; 4096]).unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        let e = w
            .write_part_owned(0, 0, 4096, vec![1; 4096])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("earlier write"),
            "{e}"
        );
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
    }
}
