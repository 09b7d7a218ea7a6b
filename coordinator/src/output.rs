//! Where a cluster job's output goes. Workers write shard files, the leader
//! writes config, tokenizer and card first and the index last, so an output
//! without its index (or, for one shard, without `model.safetensors`) is
//! recognisably unfinished. Every file appears complete or not at all
//! (written under a temporary name, then renamed).

use std::path::{Path, PathBuf};

use smelt_core::{Error, Result};

/// Name of the index file, written last.
pub const INDEX: &str = "model.safetensors.index.json";

/// A job's output location.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputLocation {
    /// A directory on a filesystem every worker shares.
    Local(PathBuf),
}

impl OutputLocation {
    /// Parses a path or URL. Relative paths are kept relative (the client
    /// resolves them before submitting).
    pub fn parse(url: &str) -> Result<OutputLocation> {
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(Error::msg(format!(
                    "output URL {url}: file:// URLs need an absolute path (file:///dir)"
                )));
            }
            return Ok(OutputLocation::Local(PathBuf::from(rest)));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(Error::msg(format!(
                "output URL {url}: scheme {scheme}:// is not supported by this build (use a path or file://)"
            )));
        }
        if url.is_empty() {
            return Err(Error::msg("output location is empty"));
        }
        Ok(OutputLocation::Local(PathBuf::from(url)))
    }

    pub fn dir(&self) -> &Path {
        match self {
            OutputLocation::Local(p) => p,
        }
    }

    /// The output's name (its last path component), for the model card.
    pub fn name(&self) -> String {
        self.dir()
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "Untitled Model (1)".into())
    }

    /// Prepares the location for a new job: refuses a non-empty one unless
    /// `overwrite`, in which case its old contents are removed (index first,
    /// so it never looks complete).
    pub fn prepare(&self, overwrite: bool) -> Result<()> {
        let dir = self.dir();
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
        let dir = self.dir();
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

    /// Publishes a finished part file under its final name.
    pub fn publish(&self, part: &str, file: &str) -> Result<()> {
        let dir = self.dir();
        let fin = dir.join(file);
        std::fs::rename(dir.join(part), &fin).map_err(|e| Error::io(&fin, e))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes every part file of job `job` (attempts of dead workers).
    pub fn remove_parts(&self, job: &str) {
        let mark = format!(".smelt-part-{job}-");
        if let Ok(rd) = std::fs::read_dir(self.dir()) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with('.') && n.contains(&mark) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Removes a part file (a discarded attempt).
    pub fn discard(&self, part: &str) {
        let _ = std::fs::remove_file(self.dir().join(part));
    }
}
