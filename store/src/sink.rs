//! Streaming planned safetensors shards to an object store.
//!
//! The executor finishes tensors in any order; object stores take a shard
//! as a sequence of parts. Each shard therefore has a reorder buffer: bytes
//! are parked until everything before them has arrived, then emitted in
//! offset order into exactly `part_size`-sized multipart parts (equal parts
//! suit every store, R2 included), which upload in the background while the
//! executor continues. A shard is completed as soon as its last byte is
//! emitted (shards smaller than one part become a single PUT, without any
//! multipart upload). The bytes are those of `io::ShardWriter`'s file:
//! header from the same `build_header`, then every slot in offset order.
//!
//! Memory: parked bytes (bounded by the executor's window, which finishes
//! tensors in plan order), plus under one part per open shard, plus at most
//! `max_inflight_parts` parts uploading.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::{Bytes, BytesMut};
use object_store::path::Path as ObjPath;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use smelt_core::io::writer::{SlotSpec, build_header};
use smelt_core::io::{ShardSink, TensorSink};
use smelt_core::{Error, Result};
use tokio::task::JoinHandle;

use crate::rt::block_on;
use crate::url::StoreUrl;

/// S3's smallest part (all parts but the last).
pub const MIN_PART: usize = 5 << 20;
/// S3's largest number of parts.
const MAX_PARTS: u64 = 10_000;

/// How shards are uploaded.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Size of every multipart part but the last; S3 needs ≥ 5 MiB. Grown
    /// for shards that would otherwise need more than 10 000 parts.
    pub part_size: usize,
    /// Parts uploading at once, across all shards of the sink.
    pub max_inflight_parts: usize,
}

impl SinkOptions {
    /// Defaults, with `SMELT_UPLOAD_PART_SIZE` (bytes; at least 5 MiB) and
    /// `SMELT_UPLOAD_CONCURRENCY` from the environment when set.
    pub fn from_env() -> Result<SinkOptions> {
        let mut o = SinkOptions::default();
        if let Ok(v) = std::env::var("SMELT_UPLOAD_PART_SIZE") {
            let n: usize = v.trim().parse().map_err(|_| {
                Error::msg(format!(
                    "SMELT_UPLOAD_PART_SIZE={v:?} is not a number of bytes"
                ))
            })?;
            if n < MIN_PART {
                return Err(Error::msg(format!(
                    "SMELT_UPLOAD_PART_SIZE={n} is below S3's minimum part size of {MIN_PART} bytes"
                )));
            }
            o.part_size = n;
        }
        if let Ok(v) = std::env::var("SMELT_UPLOAD_CONCURRENCY") {
            o.max_inflight_parts = v.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::msg(format!(
                    "SMELT_UPLOAD_CONCURRENCY={v:?} is not a positive number"
                ))
            })?;
        }
        Ok(o)
    }
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            part_size: 16 << 20,
            max_inflight_parts: 4,
        }
    }
}

/// Limits parts in flight; permits are released by the upload tasks.
#[derive(Debug)]
struct Gate {
    free: Mutex<usize>,
    cv: Condvar,
}

struct Permit(Arc<Gate>);

impl Gate {
    fn acquire(self: &Arc<Self>) -> Permit {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *f == 0 {
            f = self.cv.wait(f).unwrap_or_else(|e| e.into_inner());
        }
        *f -= 1;
        Permit(self.clone())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}

#[derive(Debug, PartialEq)]
enum State {
    Open,
    Done,
    Aborted,
}

struct Shard {
    name: String,
    path: ObjPath,
    shown: String,
    slots: Vec<SlotSpec>,
    /// absolute offset of each slot
    offsets: Vec<u64>,
    total: u64,
    part_size: usize,
    /// bytes emitted so far (everything before this offset has arrived)
    next: u64,
    /// arrived, not yet emitted: offset → bytes
    pending: BTreeMap<u64, Bytes>,
    /// emitted, not yet sent as a part
    buf: VecDeque<Bytes>,
    buf_len: usize,
    upload: Option<Box<dyn MultipartUpload>>,
    parts: Vec<JoinHandle<object_store::Result<()>>>,
    state: State,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("name", &self.name)
            .field("next", &self.next)
            .field("total", &self.total)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Uploads planned shards as the executor produces their tensors.
#[derive(Debug)]
pub struct ObjectShardSink {
    at: StoreUrl,
    /// indexed by the plan's shard index; None: not written by this sink
    shards: Vec<Option<Mutex<Shard>>>,
    gate: Arc<Gate>,
    /// first failure of a background part upload
    failed: Arc<Mutex<Option<String>>>,
    cancelled: AtomicBool,
    closed: AtomicBool,
}

impl ObjectShardSink {
    /// Prepares the shards `which` of `shards` (file names and slots as
    /// planned) under the folder `at`. Nothing is sent until bytes arrive.
    pub fn create(
        at: StoreUrl,
        shards: &[(String, Vec<SlotSpec>)],
        which: &[usize],
        opts: SinkOptions,
    ) -> Result<ObjectShardSink> {
        let mut own: Vec<Option<Mutex<Shard>>> = (0..shards.len()).map(|_| None).collect();
        for &k in which {
            let (name, slots) = shards.get(k).ok_or_else(|| {
                Error::msg(format!(
                    "internal: shard {k} requested of a plan with {} shards",
                    shards.len()
                ))
            })?;
            let (header, offsets) = build_header(slots);
            let total = header.len() as u64 + slots.iter().map(|s| s.nbytes()).sum::<u64>();
            let min_for_count = total.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
            let part_size = opts.part_size.max(1).max(min_for_count as usize);
            let mut pending = BTreeMap::new();
            pending.insert(0, Bytes::from(header));
            let mut s = Shard {
                name: name.clone(),
                path: at.child(name),
                shown: at.display_child(name),
                slots: slots.clone(),
                offsets,
                total,
                part_size,
                next: 0,
                pending,
                buf: VecDeque::new(),
                buf_len: 0,
                upload: None,
                parts: Vec::new(),
                state: State::Open,
            };
            s.drain();
            own[k] = Some(Mutex::new(s));
        }
        Ok(ObjectShardSink {
            at,
            shards: own,
            gate: Arc::new(Gate {
                free: Mutex::new(opts.max_inflight_parts.max(1)),
                cv: Condvar::new(),
            }),
            failed: Arc::new(Mutex::new(None)),
            cancelled: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// The folder written into.
    pub fn store_url(&self) -> &StoreUrl {
        &self.at
    }

    fn check_alive(&self) -> Result<()> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(Error::msg(format!("output {}: cancelled", self.at.url)));
        }
        if let Some(f) = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(Error::msg(f.clone()));
        }
        Ok(())
    }

    fn shard(&self, shard: usize) -> Result<&Mutex<Shard>> {
        self.shards
            .get(shard)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::msg(format!(
                    "internal: shard {shard} is not written by this output sink"
                ))
            })
    }

    fn put_at(
        &self,
        shard: usize,
        slot: usize,
        byte_offset: u64,
        bytes: &[u8],
        whole: bool,
    ) -> Result<()> {
        self.check_alive()?;
        let mut s = self.shard(shard)?.lock().unwrap_or_else(|e| e.into_inner());
        let spec = s.slots.get(slot).ok_or_else(|| {
            Error::msg(format!(
                "internal: slot {slot} of shard {} does not exist",
                s.name
            ))
        })?;
        let want = spec.nbytes();
        if whole && bytes.len() as u64 != want {
            return Err(Error::tensor(
                &spec.name,
                format!("internal: {} bytes for a slot of {want}", bytes.len()),
            ));
        }
        if byte_offset + bytes.len() as u64 > want {
            return Err(Error::tensor(
                &spec.name,
                "internal: partial write past the end of its slot",
            ));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        if s.state != State::Open {
            return Err(Error::tensor(
                &spec.name,
                "internal: write to a closed shard",
            ));
        }
        let at = s.offsets[slot] + byte_offset;
        let end = at + bytes.len() as u64;
        let overlaps_prev = s
            .pending
            .range(..end)
            .next_back()
            .is_some_and(|(o, b)| o + b.len() as u64 > at);
        if at < s.next || overlaps_prev {
            return Err(Error::tensor(
                &spec.name,
                "internal: bytes written twice into the same shard range",
            ));
        }
        s.pending.insert(at, Bytes::copy_from_slice(bytes));
        s.drain();
        self.send_full_parts(&mut s)?;
        if s.next == s.total {
            self.complete(&mut s)?;
        }
        Ok(())
    }

    /// Starts uploads for every whole part in the buffer.
    fn send_full_parts(&self, s: &mut Shard) -> Result<()> {
        while s.buf_len >= s.part_size {
            let part = s.take(s.part_size);
            if s.upload.is_none() {
                let (store, path) = (self.at.store.clone(), s.path.clone());
                let up = block_on(async move { store.put_multipart(&path).await })
                    .map_err(|e| crate::error(&s.shown, e))?;
                s.upload = Some(up);
            }
            let permit = self.gate.acquire();
            let fut = s.upload.as_mut().expect("upload started").put_part(part);
            let failed = self.failed.clone();
            let shown = s.shown.clone();
            s.parts.push(crate::rt::handle().spawn(async move {
                let r = fut.await;
                drop(permit);
                if let Err(e) = &r {
                    let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                    if f.is_none() {
                        *f = Some(format!("{shown}: uploading a part: {e}"));
                    }
                }
                r
            }));
        }
        Ok(())
    }

    /// Sends the rest of a fully emitted shard and completes it.
    fn complete(&self, s: &mut Shard) -> Result<()> {
        let rest = s.take(s.buf_len);
        let shown = s.shown.clone();
        match s.upload.as_mut() {
            None => {
                let (store, path) = (self.at.store.clone(), s.path.clone());
                block_on(async move { store.put(&path, rest).await })
                    .map_err(|e| crate::error(&shown, e))?;
            }
            Some(up) => {
                if rest.content_length() > 0 {
                    let permit = self.gate.acquire();
                    let fut = up.put_part(rest);
                    s.parts.push(crate::rt::handle().spawn(async move {
                        let r = fut.await;
                        drop(permit);
                        r
                    }));
                }
                let parts = std::mem::take(&mut s.parts);
                block_on(async move {
                    for p in parts {
                        match p.await {
                            Ok(r) => r?,
                            Err(e) => {
                                return Err(object_store::Error::Generic {
                                    store: "smelt",
                                    source: Box::new(e),
                                });
                            }
                        }
                    }
                    Ok(())
                })
                .map_err(|e| crate::error(&shown, e))?;
                let mut up = s.upload.take().expect("upload started");
                if let Err(e) = block_on(async move {
                    let r = up.complete().await;
                    (r, up)
                })
                .0
                {
                    return Err(crate::error(&shown, e));
                }
            }
        }
        s.state = State::Done;
        tracing::debug!(shard = %s.shown, bytes = s.total, "shard uploaded");
        Ok(())
    }

    fn abort_all(&self) {
        self.cancelled.store(true, Ordering::Release);
        for m in self.shards.iter().flatten() {
            let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
            if s.state != State::Open {
                continue;
            }
            s.state = State::Aborted;
            s.pending.clear();
            s.buf.clear();
            s.buf_len = 0;
            for p in s.parts.drain(..) {
                p.abort();
            }
            if let Some(mut up) = s.upload.take() {
                let shown = s.shown.clone();
                if let Err(e) = block_on(async move { up.abort().await }) {
                    tracing::warn!(shard = %shown, error = %e, "aborting a multipart upload failed");
                }
            }
        }
    }

    /// Shards of this sink that are completely uploaded.
    pub fn done_shards(&self) -> Vec<usize> {
        self.shards
            .iter()
            .enumerate()
            .filter_map(|(k, s)| {
                let s = s.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
                (s.state == State::Done).then_some(k)
            })
            .collect()
    }
}

impl Shard {
    /// Moves every pending chunk that starts at `next` into the buffer.
    fn drain(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let b = entry.remove();
            self.next += b.len() as u64;
            self.buf_len += b.len();
            self.buf.push_back(b);
        }
    }

    /// Takes exactly `n` buffered bytes (without copying) as a payload.
    fn take(&mut self, n: usize) -> PutPayload {
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut left = n;
        while left > 0 {
            let mut b = self.buf.pop_front().expect("buffer holds n bytes");
            if b.len() > left {
                let rest = b.split_off(left);
                self.buf.push_front(rest);
            }
            left -= b.len();
            chunks.push(b);
        }
        self.buf_len -= n;
        // tiny tails are merged so a part is not hundreds of small chunks
        if chunks.len() > 64 {
            let mut m = BytesMut::with_capacity(n);
            for c in &chunks {
                m.extend_from_slice(c);
            }
            return PutPayload::from(m.freeze());
        }
        chunks.into_iter().collect()
    }
}

impl TensorSink for ObjectShardSink {
    fn write(&self, shard: usize, slot: usize, bytes: &[u8]) -> Result<()> {
        self.put_at(shard, slot, 0, bytes, true)
    }
    fn write_part(&self, shard: usize, slot: usize, byte_offset: u64, bytes: &[u8]) -> Result<()> {
        self.put_at(shard, slot, byte_offset, bytes, false)
    }
}

impl ShardSink for ObjectShardSink {
    fn finish(self: Box<Self>) -> Result<()> {
        let r = (|| {
            self.check_alive()?;
            for m in self.shards.iter().flatten() {
                let s = m.lock().unwrap_or_else(|e| e.into_inner());
                if s.state != State::Done {
                    return Err(Error::msg(format!(
                        "internal: shard {} is incomplete: {} of {} bytes were written",
                        s.shown, s.next, s.total
                    )));
                }
            }
            Ok(())
        })();
        if r.is_err() {
            self.abort_all();
        }
        self.closed.store(true, Ordering::Release);
        r
    }

    fn abort(self: Box<Self>) {
        self.abort_all();
        self.closed.store(true, Ordering::Release);
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }
}

impl Drop for ObjectShardSink {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            // dropped without finish/abort (a panic, an early return):
            // never leave multipart uploads behind
            self.abort_all();
        }
    }
}
