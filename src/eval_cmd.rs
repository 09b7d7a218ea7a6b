//! `smelt eval …`: per-token log-probabilities, task scores, greedy
//! generation and scoring throughput, on the CPU (smelt-eval on candle).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use smelt_eval::external::{ExternalOutcome, run_external};
use smelt_eval::logprobs::{LogprobInput, read_inputs};
use smelt_eval::score::{ScoreOptions, Task, score_task};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    command: EvalCommand,
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// Per-token log-probabilities of each input line, as JSONL on stdout.
    Logprobs(LogprobsArgs),
    /// Score a task file: one JSON object of metrics on stdout.
    Score(ScoreArgs),
    /// Greedy continuation of a prompt (stops at EOS or max tokens).
    Generate(GenerateArgs),
    /// Scoring throughput (tokens/s) on random token sequences.
    Bench(EvalBenchArgs),
}

#[derive(Args, Debug)]
struct LogprobsArgs {
    /// Model directory (config.json, safetensors, tokenizer.json) or .gguf file.
    model: PathBuf,
    /// JSONL: {"id", "tokens": [int]} or {"id", "text": str} per line.
    input: PathBuf,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = smelt_eval::logprobs::DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
}

#[derive(Args, Debug)]
struct ScoreArgs {
    /// Model directory or .gguf file (with --external-cmd: the directory passed on).
    model: PathBuf,
    /// Task JSONL file (with --external-cmd: the task name passed on).
    task: String,
    /// Run `CMD MODEL TASK` instead; its last stdout line is {"score": x}.
    #[arg(long)]
    external_cmd: Option<String>,
    /// With --external-cmd: fail the candidate after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Padded tokens per forward pass (log-likelihood tasks).
    #[arg(long, default_value_t = smelt_eval::logprobs::DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
    /// Prompts decoded together (generation tasks).
    #[arg(long, default_value_t = smelt_eval::generate::DEFAULT_GEN_BATCH)]
    gen_batch: usize,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Model directory or .gguf file.
    model: PathBuf,
    /// The prompt text (encoded as transformers would, special tokens per the post-processor).
    prompt: String,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
}

#[derive(Args, Debug)]
struct EvalBenchArgs {
    /// Model directory or .gguf file.
    model: PathBuf,
    /// Sequences scored per run.
    #[arg(long, default_value_t = 16)]
    sequences: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = smelt_eval::logprobs::DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
    /// Also time transformers (float32, CPU) on the same work with this
    /// Python (which needs torch and transformers), and report the ratio.
    #[arg(long, value_name = "PYTHON")]
    compare_transformers: Option<PathBuf>,
    /// With --compare-transformers: alternate the two engines this many
    /// times and report each one's best (steadier ratios on a noisy machine).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// First write a random 100M-parameter Llama (float32: 8 layers, hidden
    /// 768, GQA 12/4 heads, intermediate 2048, vocab 32000) to MODEL, unless
    /// MODEL already has a config.json.
    #[arg(long)]
    random_llama_100m: bool,
}

/// The transformers side of `smelt eval bench --compare-transformers`.
const BENCH_TRANSFORMERS_PY: &str = include_str!("../scripts/bench_transformers.py");

fn random_llama_100m(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.join("config.json").exists() {
        return Ok(());
    }
    let spec = smelt_core::synth::LlamaSpec {
        layers: 8,
        hidden: 768,
        intermediate: 2048,
        vocab: 32000,
        heads: 12,
        kv_heads: 4,
        dtype: smelt_core::DType::F32,
        lm_head: true,
        shard_bytes: 1 << 30,
    };
    let params: usize = spec
        .tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    eprintln!(
        "writing a random Llama ({params} parameters) to {}",
        dir.display()
    );
    smelt_core::synth::write_llama(dir, &spec, 1, 0, 0.0)
        .map_err(|e| anyhow::anyhow!("writing the random model: {e}"))
}

/// Runs the embedded transformers benchmark; its JSON line.
fn bench_transformers(
    python: &std::path::Path,
    a: &EvalBenchArgs,
) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("bench_transformers.py");
    std::fs::write(&script, BENCH_TRANSFORMERS_PY)?;
    let o = std::process::Command::new(python)
        .arg(&script)
        .arg(&a.model)
        .args(["--sequences", &a.sequences.to_string()])
        .args(["--seq-len", &a.seq_len.to_string()])
        .args(["--repeat", &a.repeat.to_string()])
        .args(["--batch-tokens", &a.batch_tokens.to_string()])
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "--compare-transformers: cannot run {}: {e}",
                python.display()
            )
        })?;
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().rev().find(|l| l.trim_start().starts_with('{'));
    match (o.status.success(), line) {
        (true, Some(l)) => Ok(serde_json::from_str(l)?),
        _ => anyhow::bail!(
            "--compare-transformers: {} failed ({}); it needs torch and transformers:\n{}",
            python.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim_end()
        ),
    }
}

/// Keeps freed tensor buffers in the heap: the decoder allocates and frees
/// buffers of tens of MB per op, which glibc would otherwise hand back to
/// the kernel and fault in (zeroed) again on the next op.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before heavy use.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    keep_freed_memory();
    let dev = candle_device();
    match args.command {
        EvalCommand::Logprobs(a) => {
            let inputs = read_inputs(&a.input)?;
            let loaded = smelt_eval::load_model(&a.model, &dev)?;
            let mut seqs = Vec::with_capacity(inputs.len());
            for inp in &inputs {
                seqs.push(match inp {
                    LogprobInput::Tokens { tokens, .. } => tokens.clone(),
                    LogprobInput::Text { id, text } => match &loaded.tokenizer {
                        Some(t) => t.encode(text)?,
                        None => anyhow::bail!(
                            "{}: input {id} is text but {} has no tokenizer.json",
                            a.input.display(),
                            a.model.display()
                        ),
                    },
                });
            }
            let rows = smelt_eval::logprobs::sequence_logprobs_with(
                &loaded.model,
                &seqs,
                a.batch_tokens.max(1),
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?;
            // Everything is computed before the first line is printed: no
            // partial output that looks complete.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for ((inp, tokens), lp) in inputs.iter().zip(&seqs).zip(&rows) {
                let id = match inp {
                    LogprobInput::Tokens { id, .. } | LogprobInput::Text { id, .. } => id,
                };
                let row = serde_json::json!({"id": id, "tokens": tokens, "logprobs": lp});
                writeln!(out, "{row}")?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        EvalCommand::Score(a) => {
            if let Some(cmd) = &a.external_cmd {
                let timeout = match a.timeout {
                    Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
                    Some(t) => {
                        anyhow::bail!("--timeout must be a positive number of seconds, got {t}")
                    }
                    None => None,
                };
                return match run_external(cmd, &a.model, &a.task, timeout) {
                    ExternalOutcome::Score(s) => {
                        println!("{}", serde_json::json!({ "score": s }));
                        Ok(ExitCode::SUCCESS)
                    }
                    ExternalOutcome::Failed(why) => {
                        eprintln!("error: candidate failed: {why}");
                        Ok(ExitCode::from(1))
                    }
                };
            }
            if a.timeout.is_some() {
                anyhow::bail!("--timeout applies to --external-cmd only");
            }
            let task_path = PathBuf::from(&a.task);
            let task = Task::read(&task_path)?;
            let loaded = smelt_eval::load_model(&a.model, &dev)?;
            let Some(tok) = &loaded.tokenizer else {
                anyhow::bail!("{}: no tokenizer.json", a.model.display());
            };
            let opts = ScoreOptions {
                batch_tokens: a.batch_tokens.max(1),
                gen_batch: a.gen_batch.max(1),
            };
            let m = score_task(&loaded.model, tok, &task, &opts)
                .map_err(|e| anyhow::anyhow!("{}: {e}", task_path.display()))?;
            println!("{}", m.to_json());
            Ok(ExitCode::SUCCESS)
        }
        EvalCommand::Generate(a) => {
            let loaded = smelt_eval::load_model(&a.model, &dev)?;
            let Some(tok) = &loaded.tokenizer else {
                anyhow::bail!("{}: no tokenizer.json", a.model.display());
            };
            let prompt = tok.encode(&a.prompt)?;
            let gens = smelt_eval::generate::greedy(
                &loaded.model,
                &[prompt],
                &[a.max_new_tokens],
                &tok.eos_ids,
                1,
                &|_, _| false,
            )?;
            println!("{}{}", a.prompt, tok.decode(&gens[0])?);
            Ok(ExitCode::SUCCESS)
        }
        EvalCommand::Bench(a) => {
            if a.random_llama_100m {
                random_llama_100m(&a.model)?;
            }
            let t0 = Instant::now();
            let loaded = smelt_eval::load_model(&a.model, &dev)?;
            let load_s = t0.elapsed().as_secs_f64();
            let v = loaded.model.vocab_size() as u64;
            // Deterministic pseudo-random ids (splitmix64).
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            let mut next = || {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) % v) as u32
            };
            let seqs: Vec<Vec<u32>> = (0..a.sequences)
                .map(|_| (0..a.seq_len.max(2)).map(|_| next()).collect())
                .collect();
            let scored = seqs.iter().map(|s| s.len() - 1).sum::<usize>();
            let time_smelt = || -> anyhow::Result<f64> {
                let mut best = f64::INFINITY;
                for _ in 0..a.repeat.max(1) {
                    let t = Instant::now();
                    smelt_eval::logprobs::sequence_logprobs_with(
                        &loaded.model,
                        &seqs,
                        a.batch_tokens,
                    )?;
                    best = best.min(t.elapsed().as_secs_f64());
                }
                Ok(best)
            };
            let mut best = time_smelt()?;
            let mut theirs: Option<serde_json::Value> = None;
            if let Some(py) = &a.compare_transformers {
                for round in 0..a.rounds.max(1) {
                    if round > 0 {
                        best = best.min(time_smelt()?);
                    }
                    let t = bench_transformers(py, &a)?;
                    let faster = match &theirs {
                        Some(o) => t["best_s"].as_f64() < o["best_s"].as_f64(),
                        None => true,
                    };
                    if faster {
                        theirs = Some(t);
                    }
                }
            }
            let c = &loaded.model.config;
            let tps = (a.sequences * a.seq_len.max(2)) as f64 / best;
            let mut report = serde_json::json!({
                "model": a.model.display().to_string(),
                "layers": c.num_hidden_layers, "hidden": c.hidden_size, "vocab": c.vocab_size,
                "sequences": a.sequences, "seq_len": a.seq_len,
                "load_s": load_s, "best_s": best,
                "tokens_per_s": tps,
                "scored_tokens": scored,
                "threads": rayon::current_num_threads(),
                "kernels": if loaded.model.is_packed() { "packed-avx512" } else { "candle" },
            });
            if let Some(t) = theirs {
                let ttps = t["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
                report["rounds"] = serde_json::json!(a.rounds.max(1));
                report["transformers"] = t;
                report["ratio_vs_transformers"] = serde_json::json!(tps / ttps);
            }
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn candle_device() -> smelt_eval::Device {
    smelt_eval::Device::Cpu
}
