//! `smelt bench`: end-to-end merge benchmark on a synthetic Llama-shaped bf16
//! model family, measured against the machine's I/O floor (and optionally
//! against mergekit on the same configurations).
//!
//! Per method it times `smelt merge CONFIG OUT --quiet --overwrite` as a
//! child process (wall clock: start-up, check, merge, write, fsync) and takes
//! the child's peak RSS from its own `VmHWM` (see [`run_child`]). The floor for a method is the
//! time two parallel reader threads need to `pread` every input byte the
//! merge reads (page cache warm), plus the time to write and fsync a file of
//! the output's size next to the outputs.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use smelt_core::DType;
use smelt_core::plan::InputSource;
use smelt_core::synth::{LlamaSpec, write_family};

/// Methods `smelt bench` knows how to configure.
const METHODS: &[&str] = &[
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "della",
];
/// Seed and fine-tune delta scale of the synthetic family.
const SEED: u64 = 0;
const DELTA: f32 = 0.01;
/// Input shard size of the synthetic checkpoints (like real ~1 GB shards).
const SHARD_BYTES: u64 = 1_000_000_000;
/// Written last when a family is complete; holds its description.
const MARKER: &str = ".smelt-bench-family";
/// Read/write chunk for the floor measurement.
const CHUNK: u64 = 16 << 20;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compare {
    /// Run `mergekit-yaml` on the same configurations.
    Mergekit,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Where the model family lives (generated unless already complete there).
    /// Default: target/bench-family/<shape>.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Transformer layers.
    #[arg(long, default_value_t = 16)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// MLP intermediate size.
    #[arg(long, default_value_t = 5632)]
    intermediate: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Fine-tunes besides the base model.
    #[arg(long, default_value_t = 2)]
    fine_tunes: u64,
    /// Merge methods to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "linear,slerp,task_arithmetic,ties,dare_ties,della"
    )]
    methods: Vec<String>,
    /// Passed to `smelt merge --threads` (default: its own default, all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Also run another merger on the same configurations.
    #[arg(long, value_enum)]
    compare: Option<Compare>,
    /// Measure each floor and run each merge this many times, reporting the
    /// best time (peak RSS: the largest of the runs). Steadies the ratios on
    /// a machine whose disk or neighbours are noisy.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Keep the merge outputs (default: removed after each method).
    #[arg(long)]
    keep: bool,
    /// Also benchmark the cluster (needs etcd, and s3s-fs for the S3 part):
    /// (a) coordinator + 1 worker vs a local merge on file:// inputs, (b) S3
    /// inputs and output, 1 vs 2 workers on TIES.
    #[arg(long)]
    cluster: bool,
    /// Methods for the cluster's overhead measurement (a), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "linear,ties")]
    cluster_methods: Vec<String>,
}

/// A byte range of one input file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Range {
    file: usize,
    offset: u64,
    len: u64,
}

/// The input files of the family, and each model's tensor locations.
#[derive(Default)]
struct Inputs {
    files: Vec<PathBuf>,
    /// model dir → tensor name → range
    models: HashMap<PathBuf, BTreeMap<String, Range>>,
}

impl Inputs {
    /// Parses the safetensors headers of every `*.safetensors` file in `dir`.
    fn model(&mut self, dir: &Path) -> anyhow::Result<&BTreeMap<String, Range>> {
        if !self.models.contains_key(dir) {
            let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            names.sort();
            let mut map = BTreeMap::new();
            for p in names {
                let idx = self.files.len();
                let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                let mut n8 = [0u8; 8];
                f.read_exact_at(&mut n8, 0)?;
                let n = u64::from_le_bytes(n8);
                let mut hb = vec![0u8; n as usize];
                f.read_exact_at(&mut hb, 8)?;
                let h: serde_json::Value = serde_json::from_slice(&hb)
                    .with_context(|| format!("header of {}", p.display()))?;
                for (name, v) in h.as_object().into_iter().flatten() {
                    if name == "__metadata__" {
                        continue;
                    }
                    let offs = &v["data_offsets"];
                    let (s, e) = (offs[0].as_u64(), offs[1].as_u64());
                    let (Some(s), Some(e)) = (s, e) else {
                        bail!("{}: bad data_offsets for {name}", p.display());
                    };
                    map.insert(
                        name.clone(),
                        Range {
                            file: idx,
                            offset: 8 + n + s,
                            len: e - s,
                        },
                    );
                }
                self.files.push(p);
            }
            self.models.insert(dir.to_path_buf(), map);
        }
        Ok(&self.models[dir])
    }
}

/// One method's configuration and what its merge reads and writes.
struct Job {
    method: String,
    config: PathBuf,
    out: PathBuf,
    out_mk: PathBuf,
    /// Coalesced, sorted input byte ranges the merge reads.
    ranges: Vec<Range>,
    input_bytes: u64,
    output_bytes: u64,
    /// Names of the models read (for the floor label).
    models: Vec<String>,
}

#[derive(Clone, Copy)]
struct Floor {
    read_bytes: u64,
    read_s: f64,
    write_bytes: u64,
    write_s: f64,
}

impl Floor {
    fn total(&self) -> f64 {
        self.read_s + self.write_s
    }
}

pub(crate) struct ChildRun {
    pub(crate) wall: f64,
    pub(crate) maxrss_kb: i64,
    pub(crate) ok: bool,
    pub(crate) status: String,
    pub(crate) stderr: String,
    pub(crate) stdout: String,
}

const GB: f64 = 1e9;

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    for m in &a.methods {
        if !METHODS.contains(&m.as_str()) {
            bail!(
                "unknown benchmark method {m:?} (known: {})",
                METHODS.join(", ")
            );
        }
    }
    if a.methods.is_empty() {
        bail!("no methods given");
    }
    if let Some(m) = a
        .cluster_methods
        .iter()
        .find(|m| !METHODS.contains(&m.as_str()))
    {
        bail!(
            "unknown --cluster-methods method {m:?} (known: {})",
            METHODS.join(", ")
        );
    }
    if a.fine_tunes == 0 {
        bail!("--fine-tunes must be at least 1");
    }
    if a.layers == 0 || a.hidden == 0 || a.intermediate == 0 || a.vocab == 0 {
        bail!("--layers, --hidden, --intermediate and --vocab must be positive");
    }
    let mergekit = match a.compare {
        Some(Compare::Mergekit) => Some(find_on_path("mergekit-yaml").ok_or_else(|| {
            anyhow::anyhow!(
                "--compare mergekit: `mergekit-yaml` is not on PATH (install mergekit, e.g. `pip install mergekit`, or drop --compare)"
            )
        })?),
        None => None,
    };
    let smelt = std::env::current_exe().context("locating the smelt binary")?;

    // 1. The model family.
    let heads = if a.hidden.is_multiple_of(64) {
        a.hidden / 64
    } else {
        1
    };
    let kv_heads = (1..=(heads / 8).max(1))
        .rev()
        .find(|k| heads.is_multiple_of(*k))
        .unwrap_or(1);
    let spec = LlamaSpec {
        layers: a.layers,
        hidden: a.hidden,
        intermediate: a.intermediate,
        vocab: a.vocab,
        heads,
        kv_heads,
        dtype: DType::BF16,
        lm_head: true,
        shard_bytes: SHARD_BYTES,
    };
    let shape = format!(
        "llama-l{}-h{}-i{}-v{}-ft{}",
        a.layers, a.hidden, a.intermediate, a.vocab, a.fine_tunes
    );
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench-family").join(&shape));
    let dir = std::path::absolute(&dir).context("resolving --dir")?;
    let description = serde_json::json!({
        "shape": shape, "layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate,
        "vocab": a.vocab, "heads": heads, "kv_heads": kv_heads, "fine_tunes": a.fine_tunes,
        "seed": SEED, "delta": DELTA, "shard_bytes": SHARD_BYTES, "dtype": "bfloat16",
    })
    .to_string();
    let mut model_dirs = vec![dir.join("base")];
    model_dirs.extend((1..=a.fine_tunes).map(|k| dir.join(format!("ft{k}"))));
    let marker = dir.join(MARKER);
    let generated = if std::fs::read_to_string(&marker).ok().as_deref() == Some(&description) {
        None
    } else {
        eprintln!(
            "generating the model family in {} (base + {} fine-tunes) ...",
            dir.display(),
            a.fine_tunes
        );
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let _ = std::fs::remove_file(&marker);
        for d in &model_dirs {
            if d.exists() {
                std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
            }
        }
        let t = Instant::now();
        write_family(&dir, &spec, SEED, a.fine_tunes, DELTA)
            .context("generating the model family")?;
        let secs = t.elapsed().as_secs_f64();
        write_marker(&marker, &description)?;
        Some(secs)
    };
    let (family_bytes, family_files) = family_size(&model_dirs)?;

    // Machine and family summary.
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = meminfo_total_kb().map_or("unknown".to_string(), |kb| {
        format!("{:.1} GiB", kb as f64 / (1u64 << 20) as f64)
    });
    let cpu = cpu_model().unwrap_or_else(|| "unknown CPU".into());
    println!("smelt bench {}", env!("CARGO_PKG_VERSION"));
    println!("machine: nproc {nproc} ({cpu}), RAM {mem}");
    if free_page_reporting() {
        println!(
            "note: this VM reports freed memory to its host (virtio-balloon free page reporting): a write that needs fresh page-cache pages waits for the host to back them again, so write+fsync times (the floor's and every merge's) vary several-fold between runs"
        );
    }
    println!(
        "family: {} ({}): llama {} layers, hidden {}, intermediate {}, vocab {}, bf16; base + {} fine-tune(s); {} models × {:.2} GB = {:.2} GB in {} safetensors files",
        dir.display(),
        generated.map_or("reused".to_string(), |s| format!("generated in {s:.1} s")),
        a.layers,
        a.hidden,
        a.intermediate,
        a.vocab,
        a.fine_tunes,
        model_dirs.len(),
        family_bytes as f64 / model_dirs.len() as f64 / GB,
        family_bytes as f64 / GB,
        family_files
    );
    println!(
        "smelt merge threads: {}; times: best of {} run(s)",
        a.threads
            .map_or(format!("default ({nproc})"), |n| n.to_string()),
        a.repeat.max(1)
    );

    // 2. Configurations and what each merge reads.
    let work = dir.join("bench");
    let outs = work.join("out");
    std::fs::create_dir_all(&outs).with_context(|| format!("creating {}", outs.display()))?;
    let mut inputs = Inputs::default();
    let mut jobs = Vec::new();
    for m in &a.methods {
        let config = work.join(format!("{m}.yml"));
        let yaml = config_yaml(m, &model_dirs);
        std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
        let prepared = smelt_core::prepare(&config, &smelt_core::PlanOptions::default())
            .with_context(|| format!("planning {}", config.display()))?;
        let plan = &prepared.plan;
        let mut ranges = Vec::new();
        let mut models = Vec::new();
        for t in &plan.tensors {
            for inp in &t.inputs {
                let loc = PathBuf::from(&plan.models[inp.model].location);
                let label = loc
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned());
                if !models.contains(&label) {
                    models.push(label);
                }
                let map = inputs.model(&loc)?;
                let names: Vec<&String> = match &inp.source {
                    InputSource::Tensor(n) => vec![n],
                    InputSource::StackExperts(p) => p.iter().flatten().collect(),
                };
                for n in names {
                    let r = map
                        .get(n)
                        .with_context(|| format!("{n} not found in {}", loc.display()))?;
                    ranges.push(*r);
                }
            }
        }
        models.sort();
        ranges.sort();
        ranges.dedup();
        let input_bytes = ranges.iter().map(|r| r.len).sum();
        jobs.push(Job {
            method: m.clone(),
            config,
            out: outs.join(m),
            out_mk: outs.join(format!("{m}-mergekit")),
            ranges: coalesce(&ranges),
            input_bytes,
            output_bytes: plan.total_bytes(),
            models,
        });
    }
    let files: Vec<File> = inputs
        .files
        .iter()
        .map(|p| File::open(p).with_context(|| format!("opening {}", p.display())))
        .collect::<anyhow::Result<_>>()?;

    // 3. I/O floors (one per distinct input set and output size).
    println!(
        "I/O floor (page cache warm; read = 2 threads pread-ing every input byte the merge reads; write = one file of the output's size, written and fsynced in {}):",
        outs.display()
    );
    let mut floors: HashMap<(Vec<Range>, u64), Floor> = HashMap::new();
    for j in &jobs {
        let key = (j.ranges.clone(), j.output_bytes);
        if floors.contains_key(&key) {
            continue;
        }
        read_ranges(&files, &j.ranges)?; // warm
        let (mut read_s, mut write_s, mut read_bytes) = (f64::INFINITY, f64::INFINITY, 0);
        for _ in 0..a.repeat.max(1) {
            let t = Instant::now();
            read_bytes = read_ranges(&files, &j.ranges)?;
            read_s = read_s.min(t.elapsed().as_secs_f64());
            write_s = write_s.min(write_floor(&outs, j.output_bytes)?);
        }
        let f = Floor {
            read_bytes,
            read_s,
            write_bytes: j.output_bytes,
            write_s,
        };
        println!(
            "  {:<24} read {:.2} GB in {:.3} s ({:.2} GB/s) + write+fsync {:.2} GB in {:.3} s ({:.2} GB/s) = {:.3} s",
            j.models.join("+"),
            f.read_bytes as f64 / GB,
            f.read_s,
            f.read_bytes as f64 / GB / f.read_s,
            f.write_bytes as f64 / GB,
            f.write_s,
            f.write_bytes as f64 / GB / f.write_s,
            f.total()
        );
        floors.insert(key, f);
    }

    // 4. The merges: every smelt merge first, then mergekit's (its
    // gigabytes of freed memory would otherwise slow the next smelt runs on
    // a VM that hands freed memory back to its host).
    let smelt_cmd = |j: &Job| {
        let mut cmd = Command::new(&smelt);
        cmd.arg("merge")
            .arg(&j.config)
            .arg(&j.out)
            .args(["--quiet", "--overwrite"]);
        if let Some(n) = a.threads {
            cmd.arg("--threads").arg(n.to_string());
        }
        cmd
    };
    let mut rows = Vec::new();
    let mut failed = false;
    for j in &jobs {
        let floor = floors[&(j.ranges.clone(), j.output_bytes)];
        let mut best: Option<ChildRun> = None;
        for _ in 0..a.repeat.max(1) {
            remove_out(&j.out)?;
            read_ranges(&files, &j.ranges)?; // keep the inputs warm
            eprintln!("running smelt merge ({}) ...", j.method);
            let s = run_child(&mut smelt_cmd(j)).context("running smelt merge")?;
            if !s.ok {
                failed = true;
                report_failure("smelt merge", j, &s);
            }
            best = Some(match best {
                None => s,
                Some(b) => {
                    let maxrss_kb = b.maxrss_kb.max(s.maxrss_kb);
                    let mut keep = if !s.ok || (b.ok && b.wall <= s.wall) {
                        b
                    } else {
                        s
                    };
                    keep.maxrss_kb = maxrss_kb;
                    keep
                }
            });
        }
        if !a.keep && mergekit.is_none() {
            remove_out(&j.out)?;
        }
        rows.push((j, floor, best.expect("at least one run"), None, None));
    }
    if let Some(mk) = &mergekit {
        for (j, _, s, mk_run, agree) in rows.iter_mut() {
            remove_out(&j.out_mk)?;
            read_ranges(&files, &j.ranges)?;
            eprintln!("running mergekit-yaml ({}) ...", j.method);
            let mut cmd = Command::new(mk);
            cmd.arg(&j.config)
                .arg(&j.out_mk)
                .args(["--random-seed", "0"]);
            let r = run_child(&mut cmd).context("running mergekit-yaml")?;
            if !r.ok {
                failed = true;
                report_failure("mergekit-yaml", j, &r);
            }
            if r.ok && s.ok {
                // the speed comparison holds only if the outputs agree
                *agree = Some(
                    agreement(&j.out, &j.out_mk, &model_dirs[0]).map_err(|e| format!("{e:#}")),
                );
            }
            if !a.keep {
                remove_out(&j.out_mk)?;
                remove_out(&j.out)?;
            }
            *mk_run = Some(r);
        }
    }

    // 5. The table.
    println!();
    let mut head = format!(
        "{:<16} {:>9} {:>8} {:>8} {:>7} {:>12} {:>10}",
        "method", "input GB", "floor s", "wall s", "×floor", "peak RSS MB", "input GB/s"
    );
    if mergekit.is_some() {
        head.push_str(&format!(
            " {:>9} {:>12} {:>9}",
            "mk wall s", "mk RSS MB", "mk/smelt"
        ));
    }
    println!("{head}");
    for (j, floor, s, mk, _) in &rows {
        let mut line = if s.ok {
            format!(
                "{:<16} {:>9.2} {:>8.3} {:>8.3} {:>7.2} {:>12.0} {:>10.2}",
                j.method,
                j.input_bytes as f64 / GB,
                floor.total(),
                s.wall,
                s.wall / floor.total(),
                s.maxrss_kb as f64 * 1024.0 / 1e6,
                j.input_bytes as f64 / GB / s.wall
            )
        } else {
            format!(
                "{:<16} {:>9.2} {:>8.3} {:>8} {:>7} {:>12} {:>10}",
                j.method,
                j.input_bytes as f64 / GB,
                floor.total(),
                "FAILED",
                "-",
                "-",
                "-"
            )
        };
        if let Some(m) = mk {
            if m.ok {
                let ratio = if s.ok {
                    format!("{:.2}", m.wall / s.wall)
                } else {
                    "-".into()
                };
                line.push_str(&format!(
                    " {:>9.3} {:>12.0} {:>9}",
                    m.wall,
                    m.maxrss_kb as f64 * 1024.0 / 1e6,
                    ratio
                ));
            } else {
                line.push_str(&format!(" {:>9} {:>12} {:>9}", "FAILED", "-", "-"));
            }
        }
        println!("{line}");
    }
    println!(
        "wall: `smelt merge CONFIG OUT --quiet --overwrite` end to end (start-up, check, merge, write, fsync); ×floor = wall / floor; peak RSS = the merge process's VmHWM; input GB/s = input bytes read by the merge / wall; GB = 1e9 bytes, MB = 1e6 bytes{}",
        if mergekit.is_some() {
            "; mk/smelt = mergekit wall / smelt wall"
        } else {
            ""
        }
    );
    if rows.iter().any(|r| r.4.is_some()) {
        println!();
        println!(
            "agreement with mergekit (same configurations): worst tensor's max|smelt - mk| / max|mk|; elements whose values differ; elements changed from the base, smelt / mk"
        );
        for (j, _, _, _, agree) in &rows {
            match agree {
                Some(Ok(g)) => println!(
                    "{:<16} {:>10.3e}  {:>7.3} %  {:>7.3} % / {:>7.3} %   worst: {}",
                    j.method,
                    g.max_rel,
                    pct(g.differ, g.total),
                    pct(g.changed.0, g.changed.2),
                    pct(g.changed.1, g.changed.2),
                    if g.max_rel > 0.0 {
                        g.worst.as_str()
                    } else {
                        "-"
                    }
                ),
                Some(Err(e)) => {
                    failed = true;
                    println!("{:<16} DIFFERENT: {e}", j.method)
                }
                None => {}
            }
        }
        println!(
            "(top-k methods differ where |Δ| ties the threshold: torch breaks such ties arbitrarily; DARE/DELLA draw their masks from another generator, so their elements differ but the changed fractions agree)"
        );
    }
    if a.keep {
        println!("outputs kept in {}", outs.display());
    }
    plan_70b(&dir)?;
    if a.cluster {
        let output_bytes = jobs.first().map_or(0, |j| j.output_bytes);
        crate::bench_cluster::run(&crate::bench_cluster::Setup {
            smelt: &smelt,
            model_dirs: &model_dirs,
            work: &work,
            methods: &a.cluster_methods,
            output_bytes,
        })?;
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Times `smelt check` (header-only planning) of a 3-model TIES merge of
/// Llama-3-70B-shaped checkpoints stored as sparse files (headers, no data).
fn plan_70b(dir: &Path) -> anyhow::Result<()> {
    let root = dir.join("plan70b");
    let spec = smelt_core::synth::LlamaSpec::llama3_70b();
    for n in ["base", "ft1", "ft2"] {
        if !root.join(n).join("config.json").exists() {
            smelt_core::synth::write_llama_sparse(&root.join(n), &spec)?;
        }
    }
    // the models as file:// URLs: planning goes through object_store's
    // local backend, reading each file's header with ranged GETs
    let url = |n: &str| {
        format!(
            "file://{}",
            std::path::absolute(root.join(n))
                .unwrap_or_else(|_| root.join(n))
                .display()
        )
    };
    let yaml = |b: &str, f1: &str, f2: &str| {
        format!(
            "models:\n  - model: {f1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {f2}\n    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: ties\nbase_model: {b}\n"
        )
    };
    std::fs::write(root.join("ties.yml"), yaml("base", "ft1", "ft2"))?;
    std::fs::write(
        root.join("ties-file-url.yml"),
        yaml(&url("base"), &url("ft1"), &url("ft2")),
    )?;
    let exe = std::env::current_exe()?;
    for (cfg, what) in [
        ("ties-file-url.yml", "file:// URLs (object_store)"),
        ("ties.yml", "plain paths"),
    ] {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let r = run_child(
                Command::new(&exe)
                    .current_dir(&root)
                    .args(["check", cfg, "--json"]),
            )?;
            best = best.min(r.wall);
            if !r.stdout.contains("\"output_tensors\": 723") {
                anyhow::bail!(
                    "70B plan check did not produce the expected plan:\n{}{}",
                    r.stdout,
                    r.stderr
                );
            }
        }
        println!(
            "plan: 3-model TIES merge of Llama-3-70B-shaped checkpoints (80 layers, hidden 8192, sparse files), {what}, `smelt check` best of 3: {best:.3} s (target < 1 s)"
        );
    }
    Ok(())
}

/// The mergekit YAML for `method` over `models` (base first).
pub(crate) fn config_yaml(method: &str, models: &[PathBuf]) -> String {
    let q = |p: &Path| serde_json::Value::from(p.display().to_string()).to_string();
    let base = &models[0];
    let fts = &models[1..];
    let mut y = format!("merge_method: {method}\n");
    match method {
        "linear" => {
            let w = 1.0 / fts.len() as f64;
            y.push_str("models:\n");
            for m in fts {
                y.push_str(&format!(
                    "  - model: {}\n    parameters:\n      weight: {w}\n",
                    q(m)
                ));
            }
        }
        "slerp" => {
            y.push_str(&format!("base_model: {}\nmodels:\n", q(base)));
            y.push_str(&format!("  - model: {}\n", q(base)));
            y.push_str(&format!("  - model: {}\n", q(&fts[0])));
            y.push_str("parameters:\n  t: 0.5\n");
        }
        _ => {
            y.push_str(&format!("base_model: {}\nmodels:\n", q(base)));
            for m in fts {
                y.push_str(&format!(
                    "  - model: {}\n    parameters:\n      weight: 0.5\n",
                    q(m)
                ));
                if method != "task_arithmetic" {
                    y.push_str("      density: 0.5\n");
                }
                if method == "della" {
                    y.push_str("      epsilon: 0.1\n");
                }
            }
        }
    }
    y.push_str("dtype: bfloat16\n");
    y
}

/// Merges adjacent ranges of the same file.
fn coalesce(sorted: &[Range]) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(l) if l.file == r.file && l.offset + l.len == r.offset => l.len += r.len,
            _ => out.push(*r),
        }
    }
    out
}

/// Reads every byte of `ranges` with two threads (pread into a reused
/// buffer per thread); returns the bytes read.
fn read_ranges(files: &[File], ranges: &[Range]) -> anyhow::Result<u64> {
    let chunks: Vec<Range> = ranges
        .iter()
        .flat_map(|r| {
            (0..r.len.div_ceil(CHUNK)).map(move |k| Range {
                file: r.file,
                offset: r.offset + k * CHUNK,
                len: CHUNK.min(r.len - k * CHUNK),
            })
        })
        .collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> std::io::Result<u64> {
                    let mut buf = vec![0u8; CHUNK as usize];
                    let mut total = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(c) = chunks.get(i) else {
                            return Ok(total);
                        };
                        files[c.file].read_exact_at(&mut buf[..c.len as usize], c.offset)?;
                        total += c.len;
                    }
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().expect("reader thread panicked")?;
        }
        Ok(total)
    })
}

/// Time to write `bytes` zeros to a new file in `dir` and fsync it.
fn write_floor(dir: &Path, bytes: u64) -> anyhow::Result<f64> {
    let path = dir.join(format!(".floor-write-{}", std::process::id()));
    let buf = vec![0u8; CHUNK as usize];
    let t = Instant::now();
    let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK);
        f.write_all(&buf[..n as usize])?;
        left -= n;
    }
    f.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(secs)
}

/// The environment variable under which a `smelt` child writes its own
/// `VmHWM` (kB) to the named file as it exits (see `main`).
pub(crate) const PEAK_RSS_ENV: &str = "SMELT_PEAK_RSS_FILE";

/// `VmHWM` of process `pid` in kB (`self` for this one), if readable.
pub(crate) fn vm_hwm_kb(pid: &str) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Spawns `cmd`, waits for it and returns wall time, peak RSS and its
/// output. Peak RSS is the child's own `VmHWM` (its address space after
/// `exec`, mapped file pages included): a `smelt` child writes it to the
/// file named by [`PEAK_RSS_ENV`] as it exits; for other programs
/// (mergekit) a thread samples `/proc/PID/status` every 2 ms until the
/// child exits. `wait4`'s `ru_maxrss` is not used: Linux carries the
/// parent's high-water mark over into a child across `fork`/`exec`, so it
/// reports the bench's own footprint for a small merge.
pub(crate) fn run_child(cmd: &mut Command) -> anyhow::Result<ChildRun> {
    let report = tempfile::NamedTempFile::new().context("peak RSS report file")?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env(PEAK_RSS_ENV, report.path());
    let t = Instant::now();
    let mut child = cmd.spawn()?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let pid = child.id().to_string();
        std::thread::spawn(move || {
            let mut peak = 0i64;
            while !done.load(Ordering::Relaxed) {
                if let Some(kb) = vm_hwm_kb(&pid) {
                    peak = peak.max(kb);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        })
    };
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; zeroed is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // wait for the exit without reaping, so that the sampler cannot read a
    // reused pid's status
    loop {
        // SAFETY: siginfo_t is plain data; `pid` is our own child.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(anyhow::Error::new(e).context("waitid"));
        }
    }
    // the child's end, before the sampler's last sleep
    let wall = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let sampled = sampler.join().unwrap_or(0);
    loop {
        // SAFETY: `pid` is our own unreaped child; the out-pointers are valid.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if rc == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(anyhow::Error::new(e).context("wait4"));
        }
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let (ok, status) = if libc::WIFEXITED(status) {
        let c = libc::WEXITSTATUS(status);
        (c == 0, format!("exit status {c}"))
    } else if libc::WIFSIGNALED(status) {
        (
            false,
            format!("killed by signal {}", libc::WTERMSIG(status)),
        )
    } else {
        (false, format!("wait status {status}"))
    };
    Ok(ChildRun {
        wall,
        maxrss_kb: std::fs::read_to_string(report.path())
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(sampled),
        ok,
        status,
        stderr,
        stdout,
    })
}

fn report_failure(what: &str, j: &Job, r: &ChildRun) {
    eprintln!(
        "error: {what} failed for {} ({}); config {}",
        j.method,
        r.status,
        j.config.display()
    );
    if !r.stdout.trim().is_empty() {
        eprintln!("--- stdout ---\n{}", r.stdout.trim_end());
    }
    eprintln!("--- stderr ---\n{}", r.stderr.trim_end());
}

/// How a smelt output agrees with another merge's (mergekit's) of the
/// same configuration.
#[derive(Debug, Clone, PartialEq)]
struct Agreement {
    /// The worst tensor's max|a - b| / max|b|, and its name.
    max_rel: f64,
    worst: String,
    /// Elements whose values differ, of `total`.
    differ: u64,
    total: u64,
    /// Elements that differ from the base model's (in `a`, in `b`), of
    /// the elements of tensors the base has.
    changed: (u64, u64, u64),
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

/// Compares the model in `a` with the one in `b` tensor by tensor (the same
/// names, shapes and dtypes, or an error naming the first difference), and
/// both with the base model in `base`.
fn agreement(a: &Path, b: &Path, base: &Path) -> anyhow::Result<Agreement> {
    use smelt_core::io::ModelTensors;
    let ta = ModelTensors::open_dir(a, "smelt")?;
    let tb = ModelTensors::open_dir(b, "other")?;
    let tbase = ModelTensors::open_dir(base, "base")?;
    let (na, nb): (Vec<&String>, Vec<&String>) =
        (ta.tensors.keys().collect(), tb.tensors.keys().collect());
    if na != nb {
        let only_a = na.iter().find(|n| !tb.tensors.contains_key(**n));
        let only_b = nb.iter().find(|n| !ta.tensors.contains_key(**n));
        bail!(
            "the tensor sets differ ({} vs {} tensors; only in {}: {:?}; only in {}: {:?})",
            na.len(),
            nb.len(),
            a.display(),
            only_a,
            b.display(),
            only_b
        );
    }
    let mut g = Agreement {
        max_rel: 0.0,
        worst: String::new(),
        differ: 0,
        total: 0,
        changed: (0, 0, 0),
    };
    for name in na {
        let (la, lb) = (&ta.tensors[name], &tb.tensors[name]);
        if la.shape != lb.shape || la.dtype != lb.dtype {
            bail!(
                "{name}: {:?} {:?} in {} but {:?} {:?} in {}",
                la.dtype,
                la.shape,
                a.display(),
                lb.dtype,
                lb.shape,
                b.display()
            );
        }
        let (x, y) = (ta.read(name)?, tb.read(name)?);
        let mut diff = 0f64;
        let mut top = 0f64;
        for (p, q) in x.data.iter().zip(&y.data) {
            diff = diff.max((p - q).abs() as f64);
            top = top.max(q.abs() as f64);
            g.differ += (p.to_bits() != q.to_bits()) as u64;
        }
        g.total += x.data.len() as u64;
        let rel = if top > 0.0 { diff / top } else { diff };
        if rel > g.max_rel || g.worst.is_empty() {
            g.max_rel = rel;
            g.worst = name.clone();
        }
        if let Some(lbase) = tbase.tensors.get(name)
            && lbase.shape == la.shape
        {
            let z = tbase.read(name)?;
            for ((p, q), r) in x.data.iter().zip(&y.data).zip(&z.data) {
                g.changed.0 += (p != r) as u64;
                g.changed.1 += (q != r) as u64;
            }
            g.changed.2 += z.data.len() as u64;
        }
    }
    Ok(g)
}

fn remove_out(p: &Path) -> anyhow::Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

fn write_marker(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Total bytes and file count of the models' files.
fn family_size(dirs: &[PathBuf]) -> anyhow::Result<(u64, usize)> {
    let (mut bytes, mut files) = (0, 0);
    for d in dirs {
        for e in std::fs::read_dir(d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let md = e.metadata()?;
            if md.is_file() {
                bytes += md.len();
                if e.path().extension().is_some_and(|x| x == "safetensors") {
                    files += 1;
                }
            }
        }
    }
    Ok((bytes, files))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(|p| std::path::absolute(&p).unwrap_or(p))
}

fn meminfo_total_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Whether a virtio balloon device of this machine has free page reporting
/// (`VIRTIO_BALLOON_F_REPORTING`) negotiated.
fn free_page_reporting() -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return false;
    };
    dir.flatten().any(|d| {
        let read = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap_or_default();
        reports_free_pages(&read("device"), &read("features"))
    })
}

/// A virtio device's sysfs `device` id and `features` (one '0'/'1' per
/// feature bit, bit 0 first): a balloon (id 5) with bit 5 set.
fn reports_free_pages(device: &str, features: &str) -> bool {
    const BALLOON: u32 = 5;
    const REPORTING: usize = 5;
    let id = device.trim().trim_start_matches("0x");
    u32::from_str_radix(id, 16) == Ok(BALLOON) && features.as_bytes().get(REPORTING) == Some(&b'1')
}

fn cpu_model() -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sysfs strings of a balloon with and without free page reporting
    /// (as a Firecracker VM shows them), and of another device.
    #[test]
    fn reads_free_page_reporting_from_sysfs() {
        let on = "0110010100000000000000000000000010000000000000000000000000000000\n";
        let off = "0110000100000000000000000000000010000000000000000000000000000000\n";
        assert!(reports_free_pages("0x0005\n", on));
        assert!(!reports_free_pages("0x0005\n", off));
        assert!(!reports_free_pages("0x0002\n", on));
        assert!(!reports_free_pages("", ""));
    }

    /// A model agrees with itself; a fine-tune differs from the base where
    /// its task vector is non-zero; a model missing a tensor is named.
    #[test]
    fn agreement_counts_differences_and_names_missing_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = LlamaSpec {
            layers: 1,
            hidden: 64,
            intermediate: 128,
            vocab: 96,
            heads: 1,
            kv_heads: 1,
            dtype: DType::BF16,
            lm_head: true,
            shard_bytes: 0,
        };
        write_family(tmp.path(), &spec, 7, 1, 0.01).unwrap();
        let (base, ft) = (tmp.path().join("base"), tmp.path().join("ft1"));
        let same = agreement(&ft, &ft, &base).unwrap();
        assert_eq!((same.max_rel, same.differ), (0.0, 0));
        assert!(same.total > 0 && same.changed.2 == same.total);
        assert_eq!(same.changed.0, same.changed.1);
        assert!(same.changed.0 > same.total / 2, "{same:?}");
        let other = agreement(&ft, &base, &base).unwrap();
        assert_eq!(other.differ, same.changed.0);
        assert_eq!(other.changed.1, 0);
        assert!(other.max_rel > 0.0 && !other.worst.is_empty());
        // a family with tied embeddings: no `lm_head.weight`
        let tied = tmp.path().join("tied");
        write_family(
            &tied,
            &LlamaSpec {
                lm_head: false,
                ..spec
            },
            7,
            1,
            0.01,
        )
        .unwrap();
        let missing = "lm_head.weight";
        let e = format!(
            "{:#}",
            agreement(&ft, &tied.join("base"), &base).unwrap_err()
        );
        assert!(
            e.contains(missing) && e.contains("tensor sets differ"),
            "{e}"
        );
    }

    #[test]
    fn coalesces_adjacent_ranges() {
        let r = |file, offset, len| Range { file, offset, len };
        assert_eq!(
            coalesce(&[r(0, 0, 10), r(0, 10, 5), r(0, 20, 1), r(1, 21, 1)]),
            vec![r(0, 0, 15), r(0, 20, 1), r(1, 21, 1)]
        );
    }

    #[test]
    fn configs_parse() {
        let models: Vec<PathBuf> = ["/m/base", "/m/ft1", "/m/ft2"]
            .iter()
            .map(PathBuf::from)
            .collect();
        for m in METHODS {
            let y = config_yaml(m, &models);
            smelt_core::parse_config(&y, "bench.yml").unwrap_or_else(|e| panic!("{m}: {e}\n{y}"));
        }
    }
}
