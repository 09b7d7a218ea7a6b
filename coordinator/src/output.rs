//! Where a cluster job's output goes. Workers write shard files, the leader
//! writes config, tokenizer and card first and the index last, so an output
//! without its index (or, for one shard, without `model.safetensors`) is
//! recognisably unfinished. Every file appears complete or not at all:
//! on a shared filesystem it is written under a temporary name, then
//! renamed; on an object store (s3://, gs://) shards are multipart uploads,
//! which become visible only when completed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use smelt_core::io::{OutputLocation as Store, ShardSink};
use smelt_core::{Error, Result};

/// Name of the index file, written last.
pub const INDEX: &str = "model.safetensors.index.json";

/// A job's output location.
#[derive(Debug, Clone)]
pub enum OutputLocation {
    /// A directory on a filesystem every worker shares (a path or file://).
    Local(PathBuf),
    /// A folder on an object store (s3://, gs://, ...), through smelt-store.
    Remote(Arc<dyn Store>),
}

/// Where one task writes one shard.
pub enum ShardTarget {
    /// A part file in the output directory, renamed when the task is done.
    Part { part: String, file: String },
    /// A multipart upload under the shard's final name.
    Upload { file: String },
}

impl ShardTarget {
    /// The name the shard is written under while the task runs.
    pub fn writing_name(&self) -> &str {
        match self {
            ShardTarget::Part { part, .. } => part,
            ShardTarget::Upload { file } => file,
        }
    }
}

impl OutputLocation {
    /// Parses a path or URL. Relative paths are kept relative (the client
    /// resolves them before submitting).
    /// Other URLs (s3://, gs://) need smelt-store's resolver installed
    /// (`smelt_store::install`, as the `smelt` binary does).
    pub fn parse(url: &str) -> Result<OutputLocation> {
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(Error::msg(format!(
                    "output URL {url}: file:// URLs need an absolute path (file:///dir)"
                )));
            }
            return Ok(OutputLocation::Local(PathBuf::from(rest)));
        }
        if smelt_core::io::is_url(url) {
            return Ok(OutputLocation::Remote(smelt_core::io::open_output(url)?));
        }
        if url.is_empty() {
            return Err(Error::msg("output location is empty"));
        }
        Ok(OutputLocation::Local(PathBuf::from(url)))
    }

    /// The directory of a local output.
    pub fn local_dir(&self) -> Option<&Path> {
        match self {
            OutputLocation::Local(p) => Some(p),
            OutputLocation::Remote(_) => None,
        }
    }

    /// The output's name (its last path component), for the model card.
    pub fn name(&self) -> String {
        match self {
            OutputLocation::Local(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "Untitled Model (1)".into()),
            OutputLocation::Remote(r) => r.name(),
        }
    }

    /// Prepares the location for a new job: refuses a non-empty one unless
    /// `overwrite`, in which case its old contents are removed (index first,
    /// so it never looks complete).
    pub fn prepare(&self, overwrite: bool) -> Result<()> {
        let dir = match self {
            OutputLocation::Local(p) => p,
            OutputLocation::Remote(r) => return prepare_remote(r.as_ref(), overwrite),
        };
        if dir.exists() && !dir.is_dir() {
            return Err(Error::msg(format!(
                "output path {} exists and is not a directory; refusing to touch it",
                dir.display()
            )));
        }
        if dir.is_dir() {
            let entries: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            if !entries.is_empty() {
                if !overwrite {
                    return Err(Error::msg(format!(
                        "output directory {} exists and is not empty; pass --overwrite to replace it",
                        dir.display()
                    )));
                }
                let _ = std::fs::remove_file(dir.join(INDEX));
                for p in entries {
                    let r = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                    if let Err(e) = r
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        return Err(Error::io(&p, e));
                    }
                }
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
    }

    /// Writes one whole file atomically.
    pub fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let dir = match self {
            OutputLocation::Local(p) => p,
            OutputLocation::Remote(r) => return r.put(name, bytes),
        };
        let tmp = dir.join(format!(".{name}.smelt-part-{}", std::process::id()));
        let fin = dir.join(name);
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))
    }

    /// A temporary name for a shard being written by one task attempt.
    pub fn part_name(file: &str, job: &str, task: u32, attempt: u32) -> String {
        format!(".{file}.smelt-part-{job}-{task}-{attempt}")
    }

    /// Where attempt `attempt` of task `task` writes shard file `file`.
    pub fn shard_target(&self, file: &str, job: &str, task: u32, attempt: u32) -> ShardTarget {
        match self {
            OutputLocation::Local(_) => ShardTarget::Part {
                part: Self::part_name(file, job, task, attempt),
                file: file.to_string(),
            },
            OutputLocation::Remote(_) => ShardTarget::Upload {
                file: file.to_string(),
            },
        }
    }

    /// Opens a sink for one shard (slot layout `slots`) written under
    /// `target`'s writing name.
    pub fn open_shard(
        &self,
        target: &ShardTarget,
        slots: Vec<smelt_core::io::writer::SlotSpec>,
    ) -> Result<Box<dyn ShardSink>> {
        let shards = [(target.writing_name().to_string(), slots)];
        match self {
            OutputLocation::Local(dir) => Ok(Box::new(LocalShard(
                smelt_core::io::ShardWriter::create(dir, &shards)?,
            ))),
            OutputLocation::Remote(r) => r.create_shards(&shards, &[0]),
        }
    }

    /// Makes a finished shard visible under its final name (a rename for
    /// part files; uploads are visible once complete).
    pub fn publish(&self, target: &ShardTarget) -> Result<()> {
        let (OutputLocation::Local(dir), ShardTarget::Part { part, file }) = (self, target) else {
            return Ok(());
        };
        let fin = dir.join(file);
        std::fs::rename(dir.join(part), &fin).map_err(|e| Error::io(&fin, e))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes every part file of job `job` (attempts of dead workers).
    /// Object stores hold no part objects: an upload a dead worker left
    /// open is never visible and expires under the bucket's lifecycle rule
    /// for incomplete multipart uploads.
    pub fn remove_parts(&self, job: &str) {
        let Some(dir) = self.local_dir() else { return };
        let mark = format!(".smelt-part-{job}-");
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with('.') && n.contains(&mark) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Removes a part file (a discarded attempt).
    pub fn discard(&self, target: &ShardTarget) {
        if let (OutputLocation::Local(dir), ShardTarget::Part { part, .. }) = (self, target) {
            let _ = std::fs::remove_file(dir.join(part));
        }
    }
}

/// `prepare` on an object store: refuses a non-empty folder unless
/// `overwrite`; then deletes the completeness markers first.
fn prepare_remote(r: &dyn Store, overwrite: bool) -> Result<()> {
    let existing = r.list()?;
    if existing.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::msg(format!(
            "output {} exists and is not empty; pass --overwrite to replace it",
            r.display()
        )));
    }
    let markers = [INDEX, "model.safetensors"];
    for m in markers {
        if existing.iter().any(|e| e == m) {
            r.delete(m)?;
        }
    }
    for e in existing.iter().filter(|e| !markers.contains(&e.as_str())) {
        r.delete(e)?;
    }
    Ok(())
}

/// A local shard file as a [`ShardSink`].
struct LocalShard(smelt_core::io::ShardWriter);

impl smelt_core::io::TensorSink for LocalShard {
    fn write(&self, shard: usize, slot: usize, bytes: &[u8]) -> Result<()> {
        self.0.write(shard, slot, bytes)
    }
    fn write_part(&self, shard: usize, slot: usize, off: u64, bytes: &[u8]) -> Result<()> {
        self.0.write_part(shard, slot, off, bytes)
    }
    fn rewrites(&self) -> bool {
        self.0.rewrites()
    }
}

impl ShardSink for LocalShard {
    fn finish(self: Box<Self>) -> Result<()> {
        self.0.finish()
    }
    fn abort(self: Box<Self>) {}
    fn cancel(&self) {}
}
