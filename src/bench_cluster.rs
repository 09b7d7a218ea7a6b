//! `smelt bench --cluster`: the cluster's cost, measured on the bench family.
//!
//! (a) coordinator + 1 worker × 2 threads on `file://` inputs and output
//!     against a local `smelt merge` of the same configuration (same output
//!     shard size, so the same tasks): the cluster's overhead (target ≤ 1.2×).
//! (b) inputs and output on an S3 server (s3s-fs on loopback), 1 worker × 1
//!     thread against 2 workers × 1 thread on TIES: the speedup, and the CPU
//!     seconds each process spent (the S3 server shares the cores).
//!
//! Real components throughout: etcd (Debian's `etcd-server`), `smelt
//! coordinator`/`smelt worker` processes over gRPC, s3s-fs. Every process
//! is killed when the benchmark ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench::{ChildRun, config_yaml, run_child};

/// A background process, killed (SIGKILL) when dropped.
struct Service {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Service {
    fn spawn(name: &str, cmd: &mut Command, logdir: &Path) -> anyhow::Result<Service> {
        let log = logdir.join(format!("{name}.log"));
        let f =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Service {
            child,
            name: name.into(),
            log,
        })
    }

    /// User + system CPU seconds so far (from /proc).
    fn cpu_secs(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    fn tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of process `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn find_etcd() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("SMELT_ETCD") {
        return Ok(p.into());
    }
    for d in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin"])
    {
        let p = Path::new(d).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "--cluster needs etcd: install Debian's etcd-server package (or set SMELT_ETCD to the etcd binary)"
    )
}

/// One etcd + coordinator + workers, started fresh.
struct Cluster {
    _etcd: Service,
    coord: Service,
    workers: Vec<Service>,
    url: String,
}

impl Cluster {
    fn start(
        smelt: &Path,
        dir: &Path,
        workers: usize,
        threads: usize,
        env: &[(String, String)],
    ) -> anyhow::Result<Cluster> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let (cp, pp) = (free_port()?, free_port()?);
        let c = format!("http://127.0.0.1:{cp}");
        let p = format!("http://127.0.0.1:{pp}");
        let etcd = Service::spawn(
            "etcd",
            Command::new(find_etcd()?)
                .args(["--name", "bench", "--data-dir"])
                .arg(dir.join("etcd-data"))
                .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                .args([
                    "--listen-peer-urls",
                    &p,
                    "--initial-advertise-peer-urls",
                    &p,
                ])
                .args(["--initial-cluster", &format!("bench={p}")]),
            dir,
        )?;
        let gport = free_port()?;
        let coord = Service::spawn(
            "coordinator",
            Command::new(smelt)
                .args(["coordinator", "--etcd", &c])
                .args(["--grpc", &format!("127.0.0.1:{gport}")])
                .envs(env.iter().map(|(k, v)| (k, v))),
            dir,
        )?;
        let mut ws = Vec::new();
        for k in 0..workers {
            let id = format!("w{}", k + 1);
            ws.push(Service::spawn(
                &id,
                Command::new(smelt)
                    .args(["worker", "--etcd", &c, "--id", &id])
                    .args(["--threads", &threads.to_string()])
                    .envs(env.iter().map(|(k, v)| (k, v))),
                dir,
            )?);
        }
        let url = format!("http://127.0.0.1:{gport}");
        // ready when the coordinator answers as leader and the workers had
        // time to register
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = Command::new(smelt)
                .args(["status", "--coordinator", &url, "--json"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if o.success() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the benchmark cluster did not come up\n{}", coord.tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(1500));
        Ok(Cluster {
            _etcd: etcd,
            coord,
            workers: ws,
            url,
        })
    }

    /// Submits `cfg` → `out` with `--wait`, timed.
    fn run(
        &self,
        smelt: &Path,
        cfg: &Path,
        out: &str,
        args: &[String],
    ) -> anyhow::Result<ChildRun> {
        let r = run_child(
            Command::new(smelt)
                .args(["submit", "--coordinator", &self.url])
                .arg(cfg)
                .arg(out)
                .args(["--overwrite", "--wait"])
                .args(args),
        )?;
        if !r.ok {
            bail!(
                "cluster job failed ({}): {}\n{}\n{}",
                r.status,
                r.stderr.trim_end(),
                self.coord.tail(),
                self.workers
                    .iter()
                    .map(Service::tail)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(r)
    }
}

/// What the cluster benchmark needs from the main one.
pub struct Setup<'a> {
    pub smelt: &'a Path,
    pub model_dirs: &'a [PathBuf],
    pub work: &'a Path,
    pub methods: &'a [String],
    pub output_bytes: u64,
}

/// Output shard size giving about 8 tasks (at least 1 MB per shard).
fn shard_size(output_bytes: u64) -> u64 {
    (output_bytes.div_ceil(8)).div_ceil(1 << 20).max(1) << 20
}

pub fn run(s: &Setup) -> anyhow::Result<()> {
    let shard = shard_size(s.output_bytes);
    let shard_arg = vec!["--out-shard-size".to_string(), shard.to_string()];
    let dir = s.work.join("cluster");
    std::fs::create_dir_all(&dir)?;

    // (a) overhead on file:// inputs
    println!(
        "cluster (a): coordinator + 1 worker × 2 threads vs local `smelt merge --threads 2`, file:// inputs and output, {} MB output shards (~8 tasks):",
        shard >> 20
    );
    let urls: Vec<PathBuf> = s
        .model_dirs
        .iter()
        .map(|d| PathBuf::from(format!("file://{}", d.display())))
        .collect();
    let cluster = Cluster::start(s.smelt, &dir.join("a"), 1, 2, &[])?;
    for m in s.methods {
        let cfg = dir.join(format!("{m}-file.yml"));
        std::fs::write(&cfg, config_yaml(m, &urls))?;
        // same folder name: the model card quotes it
        let local_out = dir.join("local").join(m);
        let cl_out = dir.join("cluster").join(m);
        let local = run_child(
            Command::new(s.smelt)
                .arg("merge")
                .arg(&cfg)
                .arg(&local_out)
                .args(["--quiet", "--overwrite", "--threads", "2"])
                .args(&shard_arg),
        )?;
        if !local.ok {
            bail!("local merge failed ({}): {}", local.status, local.stderr);
        }
        let cl = cluster.run(
            s.smelt,
            &cfg,
            &format!("file://{}", cl_out.display()),
            &shard_arg,
        )?;
        let same = same_dirs(&local_out, &cl_out)?;
        println!(
            "  {m:<16} local {:>7.2} s   cluster {:>7.2} s   overhead {:>5.2}× (target ≤ 1.2×)   output identical: {}",
            local.wall,
            cl.wall,
            cl.wall / local.wall,
            if same { "yes" } else { "NO" }
        );
        if !same {
            bail!(
                "the cluster's output differs from the local merge's ({} vs {})",
                cl_out.display(),
                local_out.display()
            );
        }
        let _ = std::fs::remove_dir_all(&local_out);
        let _ = std::fs::remove_dir_all(&cl_out);
    }
    drop(cluster);

    // (b) S3 inputs and output: 1 vs 2 workers on TIES
    println!(
        "cluster (b): inputs and output on s3s-fs (loopback), TIES, 1 worker × 1 thread vs 2 workers × 1 thread:"
    );
    let s3 = smelt_store::testkit::S3Server::start();
    let t = Instant::now();
    let mut urls = Vec::new();
    for d in s.model_dirs {
        let name = d
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        smelt_store::testkit::upload_dir(&s3.store(), d, &format!("models/{name}"));
        urls.push(PathBuf::from(s3.url(&format!("models/{name}"))));
    }
    println!(
        "  uploaded the family in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let cfg = dir.join("ties-s3.yml");
    std::fs::write(&cfg, config_yaml("ties", &urls))?;
    let env = s3.env();
    let mut walls = Vec::new();
    for workers in [1usize, 2] {
        let cluster = Cluster::start(s.smelt, &dir.join(format!("b{workers}")), workers, 1, &env)?;
        let s3_cpu0 = cpu_secs(s3.pid());
        let c0 = cluster.coord.cpu_secs();
        let w0: Vec<f64> = cluster.workers.iter().map(Service::cpu_secs).collect();
        let r = cluster.run(
            s.smelt,
            &cfg,
            &s3.url(&format!("out/ties-{workers}")),
            &shard_arg,
        )?;
        let w: Vec<String> = cluster
            .workers
            .iter()
            .zip(&w0)
            .map(|(w, c)| format!("{} {:.1}", w.name, w.cpu_secs() - c))
            .collect();
        println!(
            "  {workers} worker(s): {:>7.2} s; CPU seconds: {}, coordinator {:.1}, s3s-fs {:.1}",
            r.wall,
            w.join(", "),
            cluster.coord.cpu_secs() - c0,
            cpu_secs(s3.pid()) - s3_cpu0
        );
        walls.push(r.wall);
    }
    println!(
        "  speedup 2 vs 1 worker: {:.2}× (the 2 cores are shared with s3s-fs, so no target)",
        walls[0] / walls[1]
    );
    Ok(())
}

/// Whether two output folders hold the same files with the same bytes.
fn same_dirs(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let list = |d: &Path| -> anyhow::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .with_context(|| format!("reading {}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
            .collect();
        v.sort();
        Ok(v)
    };
    let (la, lb) = (list(a)?, list(b)?);
    if la != lb {
        return Ok(false);
    }
    for n in &la {
        if !same_file(&a.join(n), &b.join(n))? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn same_file(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let open =
        |p: &Path| std::fs::File::open(p).with_context(|| format!("opening {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}
