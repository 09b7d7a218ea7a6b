//! smelt-core: the merge engine.
//!
//! Data flows one way: YAML → [`config::MergeConfig`] → [`plan::MergePlan`]
//! (headers only; serialisable) → per-tensor tasks → [`methods`] kernels →
//! [`io::ShardWriter`]. This crate knows nothing of gRPC, etcd, HTTP or the
//! CLI; it reads bytes through [`io::ByteSource`] and writes shard files.

pub mod architecture;
pub mod check;
pub mod config;
pub mod dtype;
pub mod error;
pub mod executor;
pub mod io;
pub mod lora;
pub mod methods;
pub mod model;
pub mod output;
pub mod params;
pub mod plan;
pub mod rng;
pub mod simd;
pub mod synth;
pub mod tensor;
pub mod tokenizer;
pub mod torch_kl;
pub mod torch_sort;

use std::path::{Path, PathBuf};

pub use config::{MergeConfig, parse_config};
pub use dtype::DType;
pub use error::{Error, Result};
pub use plan::{MergePlan, PlanOptions, plan_merge};
pub use tensor::Tensor;

use model::LoadedModel;

/// Everything `smelt merge` can be asked to do.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub plan: PlanOptions,
    pub overwrite: bool,
    pub copy_tokenizer: bool,
    pub write_model_card: bool,
    /// Working-set budget for tensors in flight, bytes.
    pub memory_budget: u64,
    /// Treat warnings (unknown keys, ignored parameters, ...) as errors.
    pub strict: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            plan: PlanOptions::default(),
            overwrite: false,
            copy_tokenizer: true,
            write_model_card: true,
            memory_budget: executor::DEFAULT_MEMORY_BUDGET,
            strict: false,
        }
    }
}

/// Reads and parses a configuration file.
pub fn load_config(path: &Path) -> Result<MergeConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_config(&text, &path.display().to_string())
}

/// A configuration with its models loaded (headers only) and its plan.
pub struct Prepared {
    pub config: MergeConfig,
    pub models: Vec<LoadedModel>,
    pub plan: MergePlan,
}

/// Parses, resolves models, reads headers and plans; reads no tensor data.
pub fn prepare(config_path: &Path, opts: &PlanOptions) -> Result<Prepared> {
    let config = load_config(config_path)?;
    let dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let models = config
        .referenced_models()
        .iter()
        .map(|r| model::load_model(r, &dir, opts.hf_cache.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let plan = plan_merge(&config, &models, opts)?;
    Ok(Prepared {
        config,
        models,
        plan,
    })
}

/// Free bytes on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// Checks a configuration (as `smelt check` does) and plans it; any error
/// fails, every warning is recorded in the plan.
fn checked_plan(
    config_path: &Path,
    out: Option<PathBuf>,
    opts: &MergeOptions,
) -> Result<(MergeConfig, Vec<LoadedModel>, MergePlan)> {
    let checked = check::check(
        config_path,
        &check::CheckOptions {
            plan: opts.plan.clone(),
            strict: opts.strict,
            out,
            memory_budget: opts.memory_budget,
        },
    );
    let (config, models, mut plan, report) = match checked {
        check::Checked {
            report,
            config: Some(config),
            plan: Some(plan),
            models,
        } if report.ok => (config, models, plan, report),
        check::Checked { report, .. } => {
            let errors: Vec<&check::Problem> = report
                .problems
                .iter()
                .filter(|p| p.severity == check::Severity::Error)
                .collect();
            return Err(match errors.as_slice() {
                [one] => Error::Msg(one.message.clone()),
                many => Error::Many(many.iter().map(|p| Error::Msg(p.message.clone())).collect()),
            });
        }
    };
    // every warning, as the check reported it (unknown keys, ignored
    // parameters, skipped inputs, ...)
    plan.warnings = report.problems.iter().map(|p| p.message.clone()).collect();
    Ok((config, models, plan))
}

/// Runs a whole merge into `out`. Returns the plan that was executed.
pub fn merge(
    config_path: &Path,
    out: &Path,
    opts: &MergeOptions,
    progress: executor::Progress,
) -> Result<MergePlan> {
    let (config, models, plan) = checked_plan(config_path, Some(out.to_path_buf()), opts)?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let probe = if parent.exists() {
        parent.clone()
    } else {
        PathBuf::from(".")
    };
    if let Some(free) = free_space(&probe) {
        let need = plan.total_bytes() + (16 << 20);
        if free < need {
            return Err(Error::msg(format!(
                "not enough disk space at {}: the output needs {} bytes, {} are free",
                probe.display(),
                need,
                free
            )));
        }
    }
    let staging = output::stage(out, opts.overwrite)?;
    match write_all(
        &config,
        &models,
        &plan,
        &staging.tmp_dir,
        out,
        opts,
        progress,
    ) {
        Ok(()) => {
            staging.commit()?;
            Ok(plan)
        }
        Err(e) => {
            staging.abort();
            Err(e)
        }
    }
}

/// Runs a whole merge into an [`io::OutputLocation`] (an object-store
/// prefix). Same plan, executor and bytes as [`merge`]. Order of writes:
/// config, tokenizer and model card first, then the shards (streamed as
/// tensors finish), and last the index, so an output without
/// `model.safetensors.index.json` (or, for one shard, without
/// `model.safetensors`) is unfinished. On failure everything written is
/// removed again (best effort) and open uploads are aborted.
pub fn merge_to(
    config_path: &Path,
    out: &dyn io::OutputLocation,
    opts: &MergeOptions,
    progress: executor::Progress,
) -> Result<MergePlan> {
    let (config, models, plan) = checked_plan(config_path, None, opts)?;
    let existing = out.list()?;
    if !existing.is_empty() {
        if !opts.overwrite {
            return Err(Error::msg(format!(
                "output {} exists and is not empty; pass --overwrite to replace it",
                out.display()
            )));
        }
        // the completeness markers go first, so the old output stops
        // looking finished before anything else changes
        let markers = ["model.safetensors.index.json", "model.safetensors"];
        for m in markers {
            if existing.iter().any(|e| e == m) {
                out.delete(m)?;
            }
        }
        for e in existing.iter().filter(|e| !markers.contains(&e.as_str())) {
            out.delete(e)?;
        }
    }
    let files = side_files(&config, &models, &plan, &out.name(), opts)?;
    let mut written: Vec<&str> = Vec::new();
    let result = (|| {
        for (name, bytes) in &files {
            written.push(name);
            out.put(name, bytes)?;
        }
        let tensors: Vec<io::ModelTensors> = models.iter().map(|m| m.tensors.clone()).collect();
        let all: Vec<usize> = (0..plan.tensors.len()).collect();
        let shards: Vec<usize> = (0..plan.shards.len()).collect();
        let sink = out.create_shards(&plan.shard_slots(), &shards)?;
        match executor::run_tasks(
            &plan,
            &all,
            &tensors,
            sink.as_ref(),
            opts.memory_budget,
            progress,
        ) {
            Ok(()) => sink.finish()?,
            Err(e) => {
                sink.abort();
                return Err(e);
            }
        }
        if let Some(index) = plan.index_json() {
            out.put("model.safetensors.index.json", &output::pretty_json(&index))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        // nothing of a failed merge stays behind (best effort): its side
        // files and any shard that was already complete
        for name in written {
            let _ = out.delete(name);
        }
        for s in &plan.shards {
            let _ = out.delete(&s.file_name);
        }
        return Err(e);
    }
    Ok(plan)
}

/// The files of an output besides its shards and index, in write order:
/// config.json, tokenizer files, mergekit_config.yml and README.md.
pub fn side_files(
    config: &MergeConfig,
    models: &[LoadedModel],
    plan: &MergePlan,
    out_name: &str,
    opts: &MergeOptions,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out: Vec<(String, Vec<u8>)> =
        vec![("config.json".into(), output::pretty_json(&plan.out_config))];
    if let Some(t) = &plan.tokenizer {
        let mut files = t.files.clone();
        if let Some(ct) = &plan.chat_template {
            tokenizer::apply_chat_template(&mut files, ct);
        }
        out.extend(files.into_iter().map(|(n, t)| (n, t.into_bytes())));
    } else if opts.copy_tokenizer {
        let mut copied = output::tokenizer_files(models[plan.donor].location.as_ref())?;
        if let Some(ct) = &plan.chat_template {
            let mut files: Vec<(String, String)> = copied
                .iter()
                .filter(|(n, _)| n.ends_with(".json") || n.ends_with(".jinja"))
                .filter_map(|(n, b)| String::from_utf8(b.clone()).ok().map(|t| (n.clone(), t)))
                .collect();
            // a chat template makes mergekit re-save the tokenizer through
            // transformers, which writes no generation_config.json
            copied.retain(|(n, _)| {
                n != "generation_config.json" && !files.iter().any(|(f, _)| f == n)
            });
            files.retain(|(n, _)| n != "generation_config.json");
            tokenizer::apply_chat_template(&mut files, ct);
            copied.extend(files.into_iter().map(|(n, t)| (n, t.into_bytes())));
        }
        out.extend(copied);
    }
    if opts.write_model_card {
        out.push((
            "mergekit_config.yml".into(),
            config.source_text.as_bytes().to_vec(),
        ));
        let method = methods::get(&plan.method).expect("planned method exists");
        let card = output::model_card(plan, method.as_ref(), &config.source_text, out_name);
        out.push(("README.md".into(), card.into_bytes()));
    }
    Ok(out)
}

fn write_all(
    config: &MergeConfig,
    models: &[LoadedModel],
    plan: &MergePlan,
    dir: &Path,
    out: &Path,
    opts: &MergeOptions,
    progress: executor::Progress,
) -> Result<()> {
    let writer = io::ShardWriter::create(dir, &plan.shard_slots())?;
    let tensors: Vec<io::ModelTensors> = models.iter().map(|m| m.tensors.clone()).collect();
    let all: Vec<usize> = (0..plan.tensors.len()).collect();
    executor::run_tasks(plan, &all, &tensors, &writer, opts.memory_budget, progress)?;
    writer.finish()?;
    if let Some(index) = plan.index_json() {
        output::write_file(
            dir,
            "model.safetensors.index.json",
            &output::pretty_json(&index),
        )?;
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "Untitled Model (1)".into());
    for (file, bytes) in side_files(config, models, plan, &name, opts)? {
        output::write_file(dir, &file, &bytes)?;
    }
    Ok(())
}
