//! [`ByteSource`] over one object: ranged GETs, split into chunks fetched
//! concurrently, through the blocking bridge of [`crate::rt`].

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use smelt_core::io::ByteSource;
use smelt_core::{Error, Result};

/// Reads larger than this are split into concurrent ranged GETs.
pub const CHUNK: u64 = 8 << 20;
/// Ranged GETs in flight per read.
pub const CONCURRENCY: usize = 4;
/// Extra attempts for a chunk whose body failed mid-transfer (object_store
/// retries failed requests itself, not every failure of a body stream).
const BODY_RETRIES: usize = 3;

/// The first bytes of an object are fetched once and kept: a safetensors
/// header (length, then JSON) is then one request instead of two.
const HEAD_CACHE: u64 = 64 << 10;

/// One object read by ranges.
#[derive(Debug, Clone)]
pub struct ObjectSource {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    len: u64,
    name: String,
    head: Arc<std::sync::OnceLock<Bytes>>,
}

impl ObjectSource {
    /// An object of known size (from a listing or a HEAD).
    pub fn new(store: Arc<dyn ObjectStore>, path: ObjPath, len: u64, name: String) -> Self {
        ObjectSource {
            store,
            path,
            len,
            name,
            head: Default::default(),
        }
    }

    /// Opens an object, asking the store for its size.
    pub fn open(store: Arc<dyn ObjectStore>, path: ObjPath, name: String) -> Result<Self> {
        let (s, p) = (store.clone(), path.clone());
        let meta = crate::rt::block_on(async move { s.head(&p).await })
            .map_err(|e| crate::error(&name, e))?;
        Ok(Self::new(store, path, meta.size, name))
    }
}

async fn get_chunk(
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    start: u64,
    end: u64,
) -> object_store::Result<Bytes> {
    let mut attempt = 0;
    loop {
        match store.get_range(&path, start..end).await {
            Ok(b) if b.len() as u64 == end - start => return Ok(b),
            Ok(b) => {
                if attempt >= BODY_RETRIES {
                    return Err(object_store::Error::Generic {
                        store: "smelt",
                        source: format!("ranged GET {start}..{end} returned {} bytes", b.len())
                            .into(),
                    });
                }
            }
            Err(e) => {
                let fatal = matches!(
                    e,
                    object_store::Error::NotFound { .. }
                        | object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                        | object_store::Error::InvalidPath { .. }
                );
                if fatal || attempt >= BODY_RETRIES {
                    return Err(e);
                }
            }
        }
        attempt += 1;
        tracing::debug!(path = %path, start, end, attempt, "retrying a ranged GET");
        tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
    }
}

impl ByteSource for ObjectSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let want = buf.len() as u64;
        if offset.saturating_add(want) > self.len {
            return Err(Error::format(
                &self.name,
                format!(
                    "read of {want} bytes at offset {offset} is past the end of the object ({} bytes): truncated file?",
                    self.len
                ),
            ));
        }
        if want == 0 {
            return Ok(());
        }
        if offset + want <= HEAD_CACHE.min(self.len) {
            let head = match self.head.get() {
                Some(h) => h,
                None => {
                    let (store, path) = (self.store.clone(), self.path.clone());
                    let n = HEAD_CACHE.min(self.len);
                    let b = crate::rt::block_on(get_chunk(store, path, 0, n))
                        .map_err(|e| crate::error(&self.name, e))?;
                    self.head.get_or_init(|| b)
                }
            };
            buf.copy_from_slice(&head[offset as usize..(offset + want) as usize]);
            return Ok(());
        }
        let chunks: Vec<(u64, u64)> = (0..want.div_ceil(CHUNK))
            .map(|k| {
                (
                    offset + k * CHUNK,
                    (offset + (k + 1) * CHUNK).min(offset + want),
                )
            })
            .collect();
        if chunks.len() == 1 {
            let (store, path) = (self.store.clone(), self.path.clone());
            let b = crate::rt::block_on(get_chunk(store, path, offset, offset + want))
                .map_err(|e| crate::error(&self.name, e))?;
            buf.copy_from_slice(&b);
            return Ok(());
        }
        // chunks arrive in any order on a channel and are copied into place
        // here; at most CONCURRENCY chunks are in memory besides `buf`
        let (tx, rx) = std::sync::mpsc::channel::<object_store::Result<(u64, Bytes)>>();
        let (store, path) = (self.store.clone(), self.path.clone());
        crate::rt::handle().spawn(async move {
            let mut s = futures::stream::iter(chunks)
                .map(|(a, b)| {
                    let (store, path) = (store.clone(), path.clone());
                    async move { get_chunk(store, path, a, b).await.map(|x| (a, x)) }
                })
                .buffer_unordered(CONCURRENCY);
            while let Some(r) = s.next().await {
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let mut got = 0u64;
        while got < want {
            let (a, b) = rx
                .recv()
                .map_err(|_| Error::format(&self.name, "ranged read stopped unexpectedly"))?
                .map_err(|e| crate::error(&self.name, e))?;
            let at = (a - offset) as usize;
            buf[at..at + b.len()].copy_from_slice(&b);
            got += b.len() as u64;
        }
        Ok(())
    }

    fn name(&self) -> String {
        self.name.clone()
    }
    fn small_reads_are_cheap(&self) -> bool {
        false
    }
}
