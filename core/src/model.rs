//! Resolving model references (spec §1.2, §5.1) to local directories and
//! loading what the planner needs from them: config.json and tensor headers
//! (no tensor data).
//!
//! A reference is a local directory (relative paths: the working directory
//! first, as mergekit does, then the configuration file's folder), a URL
//! (`s3://`, `gs://`, `file://`, `http(s)://`; opened through the resolver
//! registered with [`crate::io::set_url_resolver`]), or a Hugging Face id `org/name[@revision]` resolved offline from the local HF
//! cache (`--transformers-cache`, `HF_HUB_CACHE`, `HF_HOME/hub`,
//! `~/.cache/huggingface/hub`). `model+adapter` applies a PEFT LoRA adapter
//! to the model's tensors as they are read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::architecture::{self, Architecture};
use crate::config::ModelRef;
use crate::error::{Error, Result};
use crate::io::{LocalDir, ModelLocation, ModelTensors, is_url, open_location};
use crate::lora::LoraAdapter;

/// A model opened for planning and reading.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub reference: ModelRef,
    /// The model's folder (local directory or object-store prefix).
    pub location: Arc<dyn ModelLocation>,
    pub config: Value,
    pub arch: Option<Arc<Architecture>>,
    pub tensors: ModelTensors,
}

/// Hugging Face cache directories to search, in order.
pub fn hf_cache_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = explicit {
        v.push(p.to_path_buf());
    }
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        v.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HUGGINGFACE_HUB_CACHE") {
        v.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        v.push(PathBuf::from(p).join("hub"));
    }
    if let Ok(p) = std::env::var("XDG_CACHE_HOME") {
        v.push(PathBuf::from(p).join("huggingface/hub"));
    }
    if let Ok(h) = std::env::var("HOME") {
        v.push(PathBuf::from(h).join(".cache/huggingface/hub"));
    }
    v
}

/// Looks `org/name` at `revision` (branch, tag or commit; default `main`) up
/// in one HF cache directory.
pub fn resolve_hf(cache: &Path, repo: &str, revision: Option<&str>) -> Option<PathBuf> {
    let d = cache.join(format!("models--{}", repo.replace('/', "--")));
    let rev = revision.unwrap_or("main");
    let direct = d.join("snapshots").join(rev);
    if direct.is_dir() {
        return Some(direct);
    }
    let commit = std::fs::read_to_string(d.join("refs").join(rev)).ok()?;
    let snap = d.join("snapshots").join(commit.trim());
    snap.is_dir().then_some(snap)
}

/// Finds a directory for a path (+ revision).
fn resolve_path(
    path: &str,
    revision: Option<&str>,
    config_dir: &Path,
    cache: Option<&Path>,
    what: &str,
) -> Result<PathBuf> {
    let p = Path::new(path);
    let mut tried: Vec<String> = Vec::new();
    let local: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        vec![p.to_path_buf(), config_dir.join(p)]
    };
    for c in &local {
        if c.is_dir() {
            return Ok(c.clone());
        }
        tried.push(c.display().to_string());
    }
    let looks_like_repo =
        !path.starts_with('/') && !path.starts_with('.') && path.matches('/').count() == 1;
    if looks_like_repo {
        for c in hf_cache_dirs(cache) {
            if let Some(d) = resolve_hf(&c, path, revision) {
                return Ok(d);
            }
            tried.push(format!("HF cache {}", c.display()));
        }
    }
    Err(Error::msg(format!(
        "{what} {path}{}: not found (looked in {}); smelt resolves Hugging Face ids offline: download the model first (e.g. huggingface-cli download {path})",
        revision.map(|r| format!("@{r}")).unwrap_or_default(),
        tried.join(", ")
    )))
}

/// Finds a model's directory.
pub fn resolve_dir(r: &ModelRef, config_dir: &Path, cache: Option<&Path>) -> Result<PathBuf> {
    resolve_path(
        &r.path,
        r.revision.as_deref(),
        config_dir,
        cache,
        &format!("model {r}:"),
    )
    .map_err(|e| {
        Error::msg(e.to_string().replacen(
            &format!("model {r}: {}", r.path),
            &format!("model {r}:"),
            1,
        ))
    })
}

/// Finds a model's folder: a URL is opened through the registered
/// resolver, anything else is resolved as a local directory or HF id.
pub fn resolve_location(
    r: &ModelRef,
    config_dir: &Path,
    cache: Option<&Path>,
) -> Result<Arc<dyn ModelLocation>> {
    if is_url(&r.path) {
        if let Some(rev) = &r.revision {
            return Err(Error::msg(format!(
                "model {r}: a revision (@{rev}) applies to Hugging Face ids, not to URLs"
            )));
        }
        return open_location(&r.path);
    }
    Ok(Arc::new(LocalDir::new(resolve_dir(r, config_dir, cache)?)))
}

/// Loads config.json and tensor headers of one model (and its LoRA adapter).
pub fn load_model(r: &ModelRef, config_dir: &Path, cache: Option<&Path>) -> Result<LoadedModel> {
    let location = resolve_location(r, config_dir, cache)?;
    let cpath = location.file_display("config.json");
    let text = location.read_to_string("config.json")?;
    let mut config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&cpath, format!("not valid JSON: {e}")))?;
    if !config.is_object() {
        return Err(Error::format(&cpath, "not a JSON object"));
    }
    if let Some(a) = &r.override_architecture {
        config["architectures"] = Value::from(vec![a.clone()]);
    }
    let label = r.to_string();
    let arch = architecture::lookup(&config, &label)?;
    let mut tensors = ModelTensors::open(location.as_ref(), &label)?;
    if let Some(l) = &r.lora {
        if is_url(&l.path) {
            return Err(Error::msg(format!(
                "model {r}: LoRA adapters at URLs are not supported yet; use a local adapter directory"
            )));
        }
        let ldir = resolve_path(
            &l.path,
            l.revision.as_deref(),
            config_dir,
            cache,
            "LoRA adapter",
        )?;
        let adapter = LoraAdapter::open(&ldir)?;
        for t in adapter.targets() {
            let loc = tensors.tensors.get(&t).ok_or_else(|| {
                Error::msg(format!(
                    "LoRA adapter {} changes tensor {t}, which model {} does not have",
                    ldir.display(),
                    r.path
                ))
            })?;
            adapter.check_shape(&t, &loc.shape)?;
        }
        tensors.lora = Some(Arc::new(adapter));
    }
    Ok(LoadedModel {
        reference: r.clone(),
        location,
        config,
        arch,
        tensors,
    })
}
