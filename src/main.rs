//! `smelt`: the command-line front end. Thin: parses arguments, sets up
//! logging and threads, calls one library function per subcommand, maps
//! errors to exit codes (0 ok, 1 failure, 2 usage).

mod bench;
mod bench_cluster;
mod cluster_cmd;
mod eval_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "smelt",
    version,
    about = "Merge the weights of large language models (mergekit-compatible)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models as described by a mergekit YAML configuration.
    Merge(MergeArgs),
    /// Check a configuration from headers only and print the plan summary.
    Check(CheckArgs),
    /// Benchmark merges on a synthetic Llama family against the I/O floor.
    Bench(bench::BenchArgs),
    /// Run a coordinator: plans submitted merges and hands tasks to workers.
    Coordinator(cluster_cmd::CoordinatorArgs),
    /// Run a worker: takes merge tasks from the leading coordinator.
    Worker(cluster_cmd::WorkerArgs),
    /// Submit a merge to a cluster; prints the job id.
    Submit(cluster_cmd::SubmitArgs),
    /// Show cluster jobs (all, or one with its tasks).
    Status(cluster_cmd::StatusArgs),
    /// Cancel a cluster job.
    Cancel(cluster_cmd::CancelArgs),
    /// Evaluate a model: per-token log-probabilities, task scores, generation.
    Eval(eval_cmd::EvalArgs),
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The merge configuration (mergekit YAML).
    config: PathBuf,
    /// Machine-readable report on stdout.
    #[arg(long)]
    json: bool,
    /// Treat warnings (unknown keys, ignored parameters, ...) as errors.
    #[arg(long)]
    strict: bool,
    /// Allow mixing architectures.
    #[arg(long)]
    allow_crimes: bool,
    /// Where the output would be written (for the free-disk check).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Maximum shard size in bytes; suffixes K, M, B.
    #[arg(long, default_value = "5B")]
    out_shard_size: String,
    /// Hugging Face cache directory to resolve model ids in (offline).
    #[arg(long)]
    transformers_cache: Option<PathBuf>,
}

/// A mergekit boolean option: `--NAME` / `--no-NAME`, last one wins.
macro_rules! flag_pair {
    ($($field:ident, $no:ident, $long:literal, $nolong:literal, $help:literal;)*) => {
        #[derive(Args, Debug)]
        struct MergekitFlags {
            $(
                #[arg(long = $long, help = $help, overrides_with = stringify!($no))]
                $field: bool,
                #[arg(long = $nolong, hide = true, overrides_with = stringify!($field))]
                $no: bool,
            )*
        }
    };
}

flag_pair! {
    allow_crimes, no_allow_crimes, "allow-crimes", "no-allow-crimes", "Allow mixing architectures";
    unsafe_truncate_embeddings, no_unsafe_truncate_embeddings, "unsafe-truncate-embeddings", "no-unsafe-truncate-embeddings", "Accepted for mergekit 0.1.5 compatibility: differing vocabulary sizes without a tokenizer config are cut to the common rows either way, with a warning (mergekit refuses them without this flag)";
    cuda, no_cuda, "cuda", "no-cuda", "Accepted for mergekit compatibility (smelt merges on the CPU)";
    low_cpu_memory, no_low_cpu_memory, "low-cpu-memory", "no-low-cpu-memory", "Accepted for compatibility (smelt's memory is bounded anyway)";
    copy_tokenizer, no_copy_tokenizer, "copy-tokenizer", "no-copy-tokenizer", "Copy the donor's tokenizer files (default on)";
    clone_tensors, no_clone_tensors, "clone-tensors", "no-clone-tensors", "Accepted for compatibility (no effect)";
    trust_remote_code, no_trust_remote_code, "trust-remote-code", "no-trust-remote-code", "Accepted for compatibility (smelt runs no model code)";
    lazy_unpickle, no_lazy_unpickle, "lazy-unpickle", "no-lazy-unpickle", "Accepted for compatibility";
    write_model_card, no_write_model_card, "write-model-card", "no-write-model-card", "Write README.md and mergekit_config.yml (default on)";
    safe_serialization, no_safe_serialization, "safe-serialization", "no-safe-serialization", "Write safetensors (default on; .bin output is not supported)";
    quiet, no_quiet, "quiet", "no-quiet", "No progress output";
    read_to_gpu, no_read_to_gpu, "read-to-gpu", "no-read-to-gpu", "Accepted for compatibility (no effect)";
    multi_gpu, no_multi_gpu, "multi-gpu", "no-multi-gpu", "Accepted for compatibility (no effect)";
    gpu_rich, no_gpu_rich, "gpu-rich", "no-gpu-rich", "Accepted for compatibility (no effect)";
    async_write, no_async_write, "async-write", "no-async-write", "Accepted for compatibility (smelt always overlaps writes)";
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// The merge configuration (mergekit YAML).
    config: PathBuf,
    /// Output directory, or an object-store URL (s3://bucket/prefix,
    /// gs://…, file://…).
    out: PathBuf,
    #[command(flatten)]
    flags: MergekitFlags,
    /// Maximum shard size in bytes; suffixes K, M, B (×10³, ×10⁶, ×10⁹).
    #[arg(long, default_value = "5B")]
    out_shard_size: String,
    /// Seed for random methods (DARE, DELLA); recorded in the model card.
    #[arg(long, default_value_t = 0)]
    random_seed: u64,
    /// Worker threads (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Same as --threads (mergekit's option).
    #[arg(long = "num-threads", short = 'j')]
    num_threads: Option<usize>,
    /// Replace a non-empty output directory (only after the merge succeeds).
    #[arg(long)]
    overwrite: bool,
    /// Cap on the working set of tensors in flight (e.g. 512M, 4B).
    #[arg(long)]
    max_memory: Option<String>,
    /// Accepted for compatibility: smelt merges on the CPU.
    #[arg(long)]
    device: Option<String>,
    /// Hugging Face cache directory (models are resolved offline).
    #[arg(long)]
    transformers_cache: Option<PathBuf>,
    /// Where merged LoRA models are cached.
    #[arg(long)]
    lora_merge_cache: Option<PathBuf>,
    /// Dtype for applying LoRA adapters.
    #[arg(long)]
    lora_merge_dtype: Option<String>,
    /// Accepted for compatibility (smelt writes synchronously in parallel).
    #[arg(long)]
    write_threads: Option<usize>,
    /// Treat warnings (unknown keys, ignored parameters, ...) as errors.
    #[arg(long)]
    strict: bool,
    /// More logging (-v info, -vv debug).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbosity: u8,
}

/// Parses mergekit's size syntax: digits with an optional K/M/B suffix.
fn parse_size(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1_000i64),
        Some('M') => (&t[..t.len() - 1], 1_000_000),
        Some('B') | Some('G') => (&t[..t.len() - 1], 1_000_000_000),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 5B, 500M, 1000)"))?;
    Ok((v * mult as f64) as i64)
}

fn run_merge(a: MergeArgs) -> anyhow::Result<()> {
    let f = &a.flags;
    let notes: [(bool, &str); 9] = [
        (
            f.cuda || a.device.as_deref().is_some_and(|d| d != "cpu"),
            "--cuda/--device: smelt merges on the CPU",
        ),
        (
            f.low_cpu_memory,
            "--low-cpu-memory: memory is always bounded in smelt",
        ),
        (
            f.read_to_gpu || f.multi_gpu || f.gpu_rich,
            "GPU options have no effect in smelt merge",
        ),
        (f.clone_tensors, "--clone-tensors has no effect"),
        (
            f.trust_remote_code,
            "--trust-remote-code: smelt never runs model code",
        ),
        (f.lazy_unpickle, "--lazy-unpickle has no effect"),
        (
            f.no_safe_serialization,
            "--no-safe-serialization: smelt writes safetensors only",
        ),
        (
            f.async_write || a.write_threads.is_some(),
            "--async-write/--write-threads: writes always overlap compute",
        ),
        (
            a.lora_merge_cache.is_some() || a.lora_merge_dtype.is_some(),
            "--lora-merge-cache/--lora-merge-dtype: smelt applies LoRA adapters as tensors are read (f32, rounded once); nothing is cached",
        ),
    ];
    for (on, note) in notes {
        if on {
            eprintln!("note: {note}");
        }
    }
    let threads = a.threads.or(a.num_threads);
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()?;
    }
    let mut opts = smelt_core::MergeOptions::default();
    opts.plan.allow_crimes = f.allow_crimes;
    opts.plan.out_shard_size = parse_size(&a.out_shard_size).map_err(anyhow::Error::msg)?;
    opts.plan.random_seed = a.random_seed;
    opts.plan.hf_cache = a.transformers_cache.clone();
    opts.overwrite = a.overwrite;
    opts.strict = a.strict;
    opts.copy_tokenizer = !f.no_copy_tokenizer;
    opts.write_model_card = !f.no_write_model_card;
    if let Some(m) = &a.max_memory {
        opts.memory_budget = parse_size(m).map_err(anyhow::Error::msg)?.max(1) as u64;
    }
    let quiet = f.quiet;
    let start = std::time::Instant::now();
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let progress = |done: usize, total: usize, _bytes: u64| {
        if quiet {
            return;
        }
        let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
        if done == total || l.elapsed().as_millis() > 500 {
            *l = std::time::Instant::now();
            eprint!("\rmerging: {done}/{total} tensors");
            if done == total {
                eprintln!();
            }
        }
    };
    let out_s = a.out.to_string_lossy().to_string();
    let plan = if smelt_core::io::is_url(&out_s) {
        let target = smelt_core::io::open_output(&out_s)?;
        smelt_core::merge_to(&a.config, target.as_ref(), &opts, &progress)?
    } else {
        smelt_core::merge(&a.config, &a.out, &opts, &progress)?
    };
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    if !quiet {
        eprintln!(
            "wrote {} tensors ({} bytes) in {} shard(s) to {} in {:.2}s",
            plan.tensors.len(),
            plan.total_bytes(),
            plan.shards.len(),
            a.out.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn human_size(b: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// `smelt check`: exit 0 when there are no errors, 1 otherwise.
fn run_check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let opts = smelt_core::check::CheckOptions {
        plan: smelt_core::PlanOptions {
            allow_crimes: a.allow_crimes,
            out_shard_size: parse_size(&a.out_shard_size).map_err(anyhow::Error::msg)?,
            random_seed: 0,
            hf_cache: a.transformers_cache.clone(),
        },
        strict: a.strict,
        out: a.out.clone(),
        memory_budget: smelt_core::executor::DEFAULT_MEMORY_BUDGET,
    };
    let report = smelt_core::check::check(&a.config, &opts).report;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            let sev = match p.severity {
                smelt_core::check::Severity::Error => "error",
                smelt_core::check::Severity::Warning => "warning",
            };
            let at = match (p.line, p.column) {
                (Some(l), Some(c)) => format!(" (line {l}, column {c})"),
                _ => String::new(),
            };
            println!("{sev}[{}]{at}: {}", p.code, p.message);
        }
        if let Some(s) = &report.plan {
            println!(
                "plan: {} {} merge of {} model(s) ({}): {} tensors, {} in {} shard(s); estimated peak memory {}; free disk at {}: {}",
                s.method,
                s.architecture.trim_end_matches(".json"),
                s.models.len(),
                s.models.join(", "),
                s.output_tensors,
                human_size(s.output_bytes),
                s.shards,
                human_size(s.estimated_peak_memory_bytes),
                s.output_dir,
                s.free_disk_bytes
                    .map(human_size)
                    .unwrap_or_else(|| "unknown".into())
            );
        }
        let errors = report
            .problems
            .iter()
            .filter(|p| p.severity == smelt_core::check::Severity::Error)
            .count();
        let warnings = report.problems.len() - errors;
        println!(
            "{}: {errors} error(s), {warnings} warning(s)",
            if report.ok { "ok" } else { "failed" }
        );
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    // Keep freed tensor buffers in the heap for reuse instead of returning
    // them to the kernel: saves a page fault + zeroing per page per tensor.
    // SAFETY: mallopt only tunes glibc's allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    // model paths and outputs may be object-store URLs
    smelt_store::install();
    let cli = Cli::parse();
    let verbosity = match &cli.command {
        Command::Merge(a) => a.verbosity,
        Command::Coordinator(_) | Command::Worker(_) => 1,
        _ => 0,
    };
    let level = match verbosity {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::Merge(a) => run_merge(a).map(|()| ExitCode::SUCCESS),
        Command::Check(a) => run_check(a),
        Command::Bench(a) => bench::run(a),
        Command::Coordinator(a) => cluster_cmd::run_coordinator(a),
        Command::Worker(a) => cluster_cmd::run_worker(a),
        Command::Submit(a) => cluster_cmd::run_submit(a),
        Command::Status(a) => cluster_cmd::run_status(a),
        Command::Cancel(a) => cluster_cmd::run_cancel(a),
        Command::Eval(a) => eval_cmd::run(a),
    };
    // `smelt bench` asks its children for their peak RSS (see bench::run_child)
    if let Some(path) = std::env::var_os(bench::PEAK_RSS_ENV)
        && let Some(kb) = bench::vm_hwm_kb("self")
    {
        let _ = std::fs::write(path, kb.to_string());
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5B"), Ok(5_000_000_000));
        assert_eq!(parse_size("500m"), Ok(500_000_000));
        assert_eq!(parse_size("1"), Ok(1));
        assert!(parse_size("lots").is_err());
    }
}
