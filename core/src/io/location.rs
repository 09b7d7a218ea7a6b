//! Where a model's files live. The planner and readers see a model folder
//! only through [`ModelLocation`]: a local directory ([`LocalDir`]) for
//! plain paths, or (through a resolver registered by the object-store crate,
//! see [`set_url_resolver`]) an object-store prefix for URLs such as
//! `s3://bucket/models/llama`. This crate itself stays free of HTTP and
//! async code.
//!
//! The output side mirrors it: [`OutputLocation`] is a place a merge can put
//! whole files and planned safetensors shards into (a URL target of
//! `smelt merge`, or a cluster job's output).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::io::sink::ShardSink;
use crate::io::source::{ByteSource, LocalFile};
use crate::io::writer::SlotSpec;

/// A model folder: a flat set of named files.
pub trait ModelLocation: Send + Sync + std::fmt::Debug {
    /// The folder as the user wrote it (a path or a URL), for messages and
    /// for plans (workers reopen it with [`open_location`]).
    fn display(&self) -> String;
    /// How one file of the folder is named in messages.
    fn file_display(&self, name: &str) -> String;
    /// Whether `name` exists in the folder.
    fn exists(&self, name: &str) -> Result<bool>;
    /// Whether `name` exists and is a regular file (object stores: same as
    /// [`ModelLocation::exists`]).
    fn is_file(&self, name: &str) -> Result<bool> {
        self.exists(name)
    }
    /// Names of the files directly in the folder, sorted.
    fn list(&self) -> Result<Vec<String>>;
    /// Opens one file for positioned reads.
    fn open(&self, name: &str) -> Result<Arc<dyn ByteSource>>;
    /// Reads one (small) file whole.
    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let src = self.open(name)?;
        let mut buf = vec![0u8; src.len() as usize];
        src.read_at(0, &mut buf)?;
        Ok(buf)
    }
    /// Reads one (small) UTF-8 text file whole.
    fn read_to_string(&self, name: &str) -> Result<String> {
        String::from_utf8(self.read(name)?)
            .map_err(|_| Error::format(self.file_display(name), "not valid UTF-8 text"))
    }
    /// The local directory, when the folder is one.
    fn local_dir(&self) -> Option<&Path> {
        None
    }
}

/// A local directory.
#[derive(Debug, Clone)]
pub struct LocalDir {
    dir: PathBuf,
}

impl LocalDir {
    pub fn new(dir: impl Into<PathBuf>) -> LocalDir {
        LocalDir { dir: dir.into() }
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl ModelLocation for LocalDir {
    fn display(&self) -> String {
        self.dir.display().to_string()
    }
    fn file_display(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.dir.join(name).exists())
    }
    fn is_file(&self, name: &str) -> Result<bool> {
        Ok(self.dir.join(name).is_file())
    }
    fn list(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let e = e.map_err(|e| Error::io(&self.dir, e))?;
            if e.path().is_file() {
                v.push(e.file_name().to_string_lossy().to_string());
            }
        }
        v.sort();
        Ok(v)
    }
    fn open(&self, name: &str) -> Result<Arc<dyn ByteSource>> {
        Ok(Arc::new(LocalFile::open(&self.dir.join(name))?))
    }
    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let p = self.dir.join(name);
        std::fs::read(&p).map_err(|e| Error::io(&p, e))
    }
    fn read_to_string(&self, name: &str) -> Result<String> {
        let p = self.dir.join(name);
        std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
    }
    fn local_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}

/// A place a merge writes its output files into (other than a local
/// directory, which `smelt merge` stages and renames instead).
pub trait OutputLocation: Send + Sync + std::fmt::Debug {
    /// The target as the user wrote it (for messages).
    fn display(&self) -> String;
    /// The final component of the target (the model card's title).
    fn name(&self) -> String;
    /// Names of the files already there.
    fn list(&self) -> Result<Vec<String>>;
    /// Writes one whole file (replacing it).
    fn put(&self, name: &str, bytes: &[u8]) -> Result<()>;
    /// Removes one file (no error when it is absent).
    fn delete(&self, name: &str) -> Result<()>;
    /// Starts writing the planned shards `which` (indices into `shards`;
    /// the executor writes with those global indices). Every shard's bytes
    /// are identical to [`crate::io::ShardWriter`]'s file.
    fn create_shards(
        &self,
        shards: &[(String, Vec<SlotSpec>)],
        which: &[usize],
    ) -> Result<Box<dyn ShardSink>>;
}

/// Opens URL locations; registered once per process by the object-store
/// crate (`smelt_store::install()`).
pub trait UrlResolver: Send + Sync {
    /// A model folder at `url`.
    fn model_location(&self, url: &str) -> Result<Arc<dyn ModelLocation>>;
    /// An output target at `url`.
    fn output_location(&self, url: &str) -> Result<Arc<dyn OutputLocation>>;
}

static RESOLVER: RwLock<Option<Arc<dyn UrlResolver>>> = RwLock::new(None);

/// Registers the resolver for URL model paths and outputs (replacing any
/// earlier one).
pub fn set_url_resolver(r: Arc<dyn UrlResolver>) {
    *RESOLVER.write().unwrap_or_else(|e| e.into_inner()) = Some(r);
}

fn resolver(url: &str) -> Result<Arc<dyn UrlResolver>> {
    RESOLVER
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| {
            Error::msg(format!(
                "{url}: URLs need smelt's object-store support, which this program did not enable (smelt_store::install)"
            ))
        })
}

/// Whether `s` is a URL (`scheme://...`) rather than a path.
pub fn is_url(s: &str) -> bool {
    match s.find("://") {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        _ => false,
    }
}

/// Opens a model folder by path or URL (as recorded in a plan's
/// `PlannedModel::location`). Paths are not checked here; opening files
/// reports what is missing.
pub fn open_location(s: &str) -> Result<Arc<dyn ModelLocation>> {
    if is_url(s) {
        resolver(s)?.model_location(s)
    } else {
        Ok(Arc::new(LocalDir::new(s)))
    }
}

/// Opens an output target by URL.
pub fn open_output(url: &str) -> Result<Arc<dyn OutputLocation>> {
    resolver(url)?.output_location(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_told_from_paths() {
        for u in [
            "s3://b/p",
            "gs://b",
            "file:///tmp/x",
            "https://h/x",
            "s3+x://b",
        ] {
            assert!(is_url(u), "{u}");
        }
        for p in [
            "/tmp/x", "rel/dir", "org/name", "./a://b", "://x", "C:/x", "1a://x",
        ] {
            assert!(!is_url(p), "{p}");
        }
    }

    #[test]
    fn local_dir_reads_lists_and_names_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("b.json"), "{}").unwrap();
        std::fs::write(d.path().join("a.bin"), [1u8, 2, 3]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let l = LocalDir::new(d.path());
        assert_eq!(l.list().unwrap(), vec!["a.bin", "b.json"]);
        assert!(l.exists("sub").unwrap() && !l.is_file("sub").unwrap());
        assert_eq!(l.read("a.bin").unwrap(), vec![1, 2, 3]);
        assert_eq!(l.open("a.bin").unwrap().len(), 3);
        assert_eq!(l.read_to_string("b.json").unwrap(), "{}");
        let e = l.read_to_string("missing.json").unwrap_err().to_string();
        assert!(
            e.contains(&d.path().join("missing.json").display().to_string()),
            "{e}"
        );
        assert!(
            open_location(&d.path().display().to_string())
                .unwrap()
                .local_dir()
                .is_some()
        );
    }
}
