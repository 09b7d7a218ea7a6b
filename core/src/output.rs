//! The output directory: staged in a temporary sibling and renamed into place
//! only when complete, so an interrupted or failed merge never leaves a
//! directory that looks finished. Also writes config.json, tokenizer files,
//! mergekit_config.yml and the model card.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::ModelLocation;
use crate::methods::MergeMethod;
use crate::plan::MergePlan;

const TMP_MARK: &str = ".smelt-tmp-";

/// A staged output directory.
#[derive(Debug)]
pub struct Staging {
    pub final_dir: PathBuf,
    pub tmp_dir: PathBuf,
    overwrite: bool,
}

/// Checks `out` and creates a temporary sibling to write into. Removes stale
/// temporaries of earlier killed runs (whose process is gone).
pub fn stage(out: &Path, overwrite: bool) -> Result<Staging> {
    if out.exists() && !out.is_dir() {
        return Err(Error::msg(format!(
            "output path {} exists and is not a directory; refusing to touch it",
            out.display()
        )));
    }
    if out.is_dir() {
        let non_empty = fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some();
        if non_empty && !overwrite {
            return Err(Error::msg(format!(
                "output directory {} exists and is not empty; pass --overwrite to replace it",
                out.display()
            )));
        }
    }
    let name = out
        .file_name()
        .ok_or_else(|| {
            Error::msg(format!(
                "output path {} has no final component",
                out.display()
            ))
        })?
        .to_string_lossy()
        .to_string();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    }
    clean_stale(&parent, &name);
    let tmp_dir = parent.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
    if tmp_dir.exists() {
        fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    }
    fs::create_dir(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    Ok(Staging {
        final_dir: out.to_path_buf(),
        tmp_dir,
        overwrite,
    })
}

fn clean_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}{TMP_MARK}");
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let f = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = f.strip_prefix(&prefix)
            && let Ok(pid) = pid.parse::<u32>()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl Staging {
    /// Moves the finished directory into place.
    pub fn commit(self) -> Result<()> {
        sync_dir(&self.tmp_dir)?;
        if self.final_dir.exists() {
            if !self.overwrite
                && fs::read_dir(&self.final_dir)
                    .map(|mut r| r.next().is_some())
                    .unwrap_or(false)
            {
                return Err(Error::msg(format!(
                    "output directory {} appeared during the merge; result left in {}",
                    self.final_dir.display(),
                    self.tmp_dir.display()
                )));
            }
            let trash = self.tmp_dir.with_extension("old");
            fs::rename(&self.final_dir, &trash).map_err(|e| Error::io(&self.final_dir, e))?;
            fs::rename(&self.tmp_dir, &self.final_dir)
                .map_err(|e| Error::io(&self.final_dir, e))?;
            let _ = fs::remove_dir_all(&trash);
        } else {
            fs::rename(&self.tmp_dir, &self.final_dir)
                .map_err(|e| Error::io(&self.final_dir, e))?;
        }
        if let Some(p) = self.final_dir.parent() {
            let _ = sync_dir(if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            });
        }
        Ok(())
    }

    /// Removes the temporary directory (after a failure).
    pub fn abort(self) {
        let _ = fs::remove_dir_all(&self.tmp_dir);
    }
}

fn sync_dir(p: &Path) -> Result<()> {
    let f = fs::File::open(p).map_err(|e| Error::io(p, e))?;
    f.sync_all().map_err(|e| Error::io(p, e))
}

/// Writes a file into the staging dir.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let p = dir.join(name);
    fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
}

/// JSON with 2-space indentation and a trailing newline (transformers' style).
pub fn pretty_json(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).expect("JSON serialises");
    s.push(b'\n');
    s
}

/// Tokenizer files copied from the donor (spec §5.4).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
];

/// The donor's tokenizer files that exist, with their bytes (copied as
/// they are). Empty when the donor has no tokenizer at all.
pub fn tokenizer_files(donor: &dyn ModelLocation) -> Result<Vec<(String, Vec<u8>)>> {
    let mut copied = Vec::new();
    if !donor.exists("tokenizer_config.json")?
        && !donor.exists("tokenizer.json")?
        && !donor.exists("tokenizer.model")?
    {
        return Ok(copied);
    }
    // mergekit 0.1.5 copies the files when the donor has
    // tokenizer_config.json and tokenizer.json or tokenizer.model — not
    // vocab.json then; otherwise transformers re-serialises the tokenizer
    // (vocab.json included for BPE tokenizers without tokenizer.json)
    let copy_mode = donor.exists("tokenizer_config.json")?
        && (donor.exists("tokenizer.json")? || donor.exists("tokenizer.model")?);
    for f in TOKENIZER_FILES {
        if copy_mode && *f == "vocab.json" {
            continue;
        }
        if donor.is_file(f)? {
            // copy contents, not permissions (inputs may be read-only)
            copied.push((f.to_string(), donor.read(f)?));
        }
    }
    Ok(copied)
}

/// The README.md model card (spec §5.5).
pub fn model_card(plan: &MergePlan, method: &dyn MergeMethod, yaml: &str, name: &str) -> String {
    let mname = match method.reference_url() {
        Some(u) => format!("[{}]({u})", method.pretty_name()),
        None => method.pretty_name().to_string(),
    };
    let is_hf = |p: &str| {
        !p.starts_with('/')
            && !p.starts_with('~')
            && !p.starts_with('.')
            && p.matches('/').count() == 1
    };
    let mut hf: Vec<String> = plan
        .models
        .iter()
        .map(|m| m.reference.path.clone())
        .filter(|p| is_hf(p) && !Path::new(p).exists())
        .collect();
    hf.dedup();
    let base_list = if hf.is_empty() {
        "base_model: []\n".to_string()
    } else {
        format!(
            "base_model:\n{}",
            hf.iter().map(|h| format!("- {h}\n")).collect::<String>()
        )
    };
    let base_clause = match (plan.base, plan.method.as_str()) {
        (Some(b), m) if m != "slerp" => format!(
            " using {} as a base",
            render(&plan.models[b].reference.to_string(), is_hf)
        ),
        _ => String::new(),
    };
    let models: String = plan
        .models
        .iter()
        .enumerate()
        .filter(|(i, _)| plan.method == "slerp" || Some(*i) != plan.base)
        .map(|(_, m)| format!("* {}\n", render(&m.reference.to_string(), is_hf)))
        .collect();
    format!(
        "---\n{base_list}library_name: transformers\ntags:\n- mergekit\n- merge\n- smelt\n\n---\n# {name}\n\n\
This is a merge of pre-trained language models created with smelt, a mergekit-compatible merge tool \
(configuration format of [mergekit](https://github.com/cg123/mergekit)).\n\n\
## Merge Details\n### Merge Method\n\n\
This model was merged using the {mname} merge method{base_clause}.\n\n\
Random seed: {seed}.\n\n\
### Models Merged\n\nThe following models were included in the merge:\n{models}\n\
### Configuration\n\nThe following YAML configuration was used to produce this model:\n\n```yaml\n{yaml}\n```\n",
        seed = plan.seed,
    )
}

fn render(r: &str, is_hf: impl Fn(&str) -> bool) -> String {
    if is_hf(r) && !Path::new(r).exists() {
        format!("[{r}](https://huggingface.co/{r})")
    } else {
        r.replace('+', " + ")
    }
}
