//! Resolving model references to local directories and loading what the
//! planner needs from them: config.json and safetensors headers (no tensor
//! data).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::architecture::{self, Architecture};
use crate::config::ModelRef;
use crate::error::{Error, Result};
use crate::io::ModelTensors;

/// A model opened for planning and reading.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub reference: ModelRef,
    pub dir: PathBuf,
    pub config: Value,
    pub arch: Option<Arc<Architecture>>,
    pub tensors: ModelTensors,
}

/// Finds a model's directory. A relative path is looked up in the working
/// directory first (mergekit's rule), then next to the configuration file.
pub fn resolve_dir(r: &ModelRef, config_dir: &Path) -> Result<PathBuf> {
    if r.lora.is_some() {
        return Err(Error::msg(format!(
            "model {r}: LoRA references (model+adapter) are not supported yet"
        )));
    }
    let p = Path::new(&r.path);
    let candidates: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        vec![p.to_path_buf(), config_dir.join(p)]
    };
    for c in &candidates {
        if c.is_dir() {
            return Ok(c.clone());
        }
    }
    Err(Error::msg(format!(
        "model {r}: not found: no directory {} (Hugging Face Hub ids are not resolved yet; download the model and give its path)",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

/// Loads config.json and tensor headers of one model.
pub fn load_model(r: &ModelRef, config_dir: &Path) -> Result<LoadedModel> {
    let dir = resolve_dir(r, config_dir)?;
    let cpath = dir.join("config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
    let mut config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(cpath.display(), format!("not valid JSON: {e}")))?;
    if !config.is_object() {
        return Err(Error::format(cpath.display(), "not a JSON object"));
    }
    if let Some(a) = &r.override_architecture {
        config["architectures"] = Value::from(vec![a.clone()]);
    }
    let label = r.to_string();
    let arch = architecture::lookup(&config, &label)?;
    let tensors = ModelTensors::open_dir(&dir, &label)?;
    Ok(LoadedModel {
        reference: r.clone(),
        dir,
        config,
        arch,
        tensors,
    })
}
