//! Where bytes come from. The merge engine reads inputs only through
//! [`ByteSource`], so a cluster worker can hand it ranged object-store reads
//! while `smelt merge` hands it local files.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Random-access, read-only bytes with a known length.
pub trait ByteSource: Send + Sync + std::fmt::Debug {
    /// Total length in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; errors if the range is past the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// A human-readable name (path or URL) for error messages.
    fn name(&self) -> String;
    /// Whether many small positioned reads are cheap (a local file).
    /// Sources that pay a round trip per request (object stores) say no:
    /// the executor then reads each input tensor whole, in large concurrent
    /// ranges, instead of streaming it in small blocks over several passes.
    fn small_reads_are_cheap(&self) -> bool {
        true
    }
}

/// A local file read with positioned reads (no mapping: resident memory
/// stays bounded by what the executor holds).
#[derive(Debug)]
pub struct LocalFile {
    path: PathBuf,
    file: File,
    len: u64,
}

impl LocalFile {
    pub fn open(path: &Path) -> Result<LocalFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(LocalFile {
            path: path.to_path_buf(),
            file,
            len,
        })
    }
}

impl ByteSource for LocalFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(Error::format(
                self.path.display(),
                format!(
                    "read of {} bytes at offset {offset} is past the end of the file ({} bytes): truncated file?",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, e))
    }
    fn name(&self) -> String {
        self.path.display().to_string()
    }
}
