//! The cluster end to end, with real components: an etcd server (Debian's
//! etcd-server), coordinator and worker processes talking gRPC over
//! loopback, ports picked at run time, everything killed at the end.
//! Outputs are compared byte for byte with a local `smelt merge`.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use common::{assert_ok, smelt};
use smelt_core::DType;
use smelt_core::synth::{LlamaSpec, write_family};
use smelt_store::testkit::{FaultProxy, ProxyConfig, S3Server, read_folder, upload_dir};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) when dropped.
struct Proc {
    child: Option<Child>,
    name: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, logdir: &Path) -> Proc {
        let log = logdir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.into(),
            log,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        format!(
            "--- {} log ---\n{}",
            self.name,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn etcd_binary() -> PathBuf {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("etcd not found: install Debian's etcd-server package (scripts/test.sh does)");
}

struct Etcd {
    proc: Proc,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    logdir: PathBuf,
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let mut e = Etcd {
            proc: Proc {
                child: None,
                name: "etcd".into(),
                log: dir.join("etcd.log"),
            },
            client_port: free_port(),
            peer_port: free_port(),
            data: dir.join("etcd-data"),
            logdir: dir.to_path_buf(),
        };
        e.launch();
        e
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn launch(&mut self) {
        let c = format!("http://127.0.0.1:{}", self.client_port);
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_binary());
        cmd.args(["--name", "t1", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("t1={p}")])
            .args(["--heartbeat-interval=10", "--election-timeout=100"]);
        self.proc = Proc::spawn("etcd", cmd, &self.logdir);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if http_get(self.client_port, "/health").is_some_and(|b| b.contains("true")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy\n{}",
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn restart(&mut self) {
        self.proc.kill();
        std::thread::sleep(Duration::from_millis(500));
        self.launch();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn coordinator(etcd: &Etcd, name: &str, dir: &Path) -> (Proc, String) {
    coordinator_env(etcd, name, dir, &[])
}

fn coordinator_env(
    etcd: &Etcd,
    name: &str,
    dir: &Path,
    env: &[(String, String)],
) -> (Proc, String) {
    let port = free_port();
    let mut cmd = smelt();
    cmd.args(["coordinator", "--etcd", &etcd.url()])
        .args(["--grpc", &format!("127.0.0.1:{port}")])
        .args(["--lease-ttl", "2"])
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)));
    (
        Proc::spawn(name, cmd, dir),
        format!("http://127.0.0.1:{port}"),
    )
}

fn worker(etcd: &Etcd, name: &str, dir: &Path, env: &[(&str, &str)]) -> Proc {
    let mut cmd = smelt();
    cmd.args(["worker", "--etcd", &etcd.url(), "--id", name])
        .args(["--threads", "2", "--lease-ttl", "2"])
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(name, cmd, dir)
}

fn worker_env(etcd: &Etcd, name: &str, dir: &Path, env: &[(String, String)]) -> Proc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    worker(etcd, name, dir, &env)
}

/// A dare_ties config over a 3-model bf16 family whose inputs are sharded.
fn family(dir: &Path) -> PathBuf {
    let spec = LlamaSpec {
        layers: 3,
        shard_bytes: 30_000,
        ..LlamaSpec::tiny()
    };
    let ms = write_family(&dir.join("fam"), &spec, 7, 2, 0.02).unwrap();
    let cfg = dir.join("cfg.yml");
    std::fs::write(
        &cfg,
        "models:\n  - model: fam/ft1\n    parameters: {weight: 1, density: 0.5}\n  - model: fam/ft2\n    parameters: {weight: 0.5, density: 0.7}\nmerge_method: dare_ties\nbase_model: fam/base\ndtype: bfloat16\n",
    )
    .unwrap();
    assert!(ms.len() == 3);
    cfg
}

const SHARD: &str = "20K";

fn local_merge(cfg: &Path, out: &Path) {
    let o = smelt()
        .arg("merge")
        .arg(cfg)
        .arg(out)
        .args(["--quiet", "--random-seed", "5", "--out-shard-size", SHARD])
        .output()
        .unwrap();
    assert_ok(&o);
}

fn submit(coord: &str, cfg: &Path, out: &Path, wait: bool) -> std::process::Output {
    let mut c = smelt();
    c.args(["submit", "--coordinator", coord])
        .arg(cfg)
        .arg(out)
        .args(["--random-seed", "5", "--out-shard-size", SHARD]);
    if wait {
        c.arg("--wait");
    }
    c.output().unwrap()
}

/// Submits without waiting; the job id.
fn submit_job(coord: &str, cfg: &Path, out: &Path) -> String {
    let o = submit(coord, cfg, out, false);
    assert_ok(&o);
    job_id(&o)
}

fn status(coord: &str, job: &str) -> Option<serde_json::Value> {
    let o = smelt()
        .args(["status", "--coordinator", coord, job, "--json"])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

fn wait_for(
    coord: &str,
    job: &str,
    what: &str,
    limit: Duration,
    logs: &dyn Fn() -> String,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = status(coord, job)
            && pred(&s)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// Every file of two output directories is byte-identical (same names).
fn assert_same_dir(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    assert_eq!(na, nb, "file lists differ");
    assert!(na.iter().any(|n| n == "model.safetensors.index.json"));
    for n in &na {
        let x = std::fs::read(a.join(n)).unwrap();
        let y = std::fs::read(b.join(n)).unwrap();
        assert!(
            x == y,
            "{n} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn job_id(o: &std::process::Output) -> String {
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        !s.is_empty() && !s.contains(char::is_whitespace),
        "submit printed {s:?}; stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    s
}

#[test]
fn two_workers_reproduce_the_local_merge_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = family(d);
    local_merge(&cfg, &d.join("local/out"));
    let etcd = Etcd::start(d);
    let (c, url) = coordinator(&etcd, "coord", d);
    let w1 = worker(&etcd, "w1", d, &[]);
    let w2 = worker(&etcd, "w2", d, &[]);
    let o = submit(&url, &cfg, &d.join("dist/out"), true);
    let logs = || format!("{}\n{}\n{}", c.log(), w1.log(), w2.log());
    assert!(
        o.status.success(),
        "submit --wait failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        logs()
    );
    let id = job_id(&o);
    let st = status(&url, &id).expect("status");
    assert_eq!(st["state"], "succeeded");
    let tasks = st["tasks"].as_array().unwrap();
    assert!(tasks.len() >= 4, "{} tasks", tasks.len());
    // both workers took part, each task ran once
    let workers: std::collections::BTreeSet<&str> = tasks
        .iter()
        .map(|t| t["worker"].as_str().unwrap())
        .collect();
    assert!(
        tasks
            .iter()
            .all(|t| t["attempts"] == 1 && t["state"] == "done")
    );
    assert!(!workers.is_empty());
    assert_same_dir(&d.join("local/out"), &d.join("dist/out"));
}

#[test]
fn a_killed_worker_loses_only_its_task() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = family(d);
    local_merge(&cfg, &d.join("local/out"));
    let etcd = Etcd::start(d);
    let (c, url) = coordinator(&etcd, "coord", d);
    // w1 stalls after its first tensor, holding its task
    let mut w1 = worker(&etcd, "w1", d, &[("SMELT_CHAOS_STALL_AFTER", "1")]);
    let id = submit_job(&url, &cfg, &d.join("dist/out"));
    let logs = || format!("{}\n{}", c.log(), w1.log());
    let st = wait_for(
        &url,
        &id,
        "w1 to take a task",
        Duration::from_secs(60),
        &logs,
        |s| {
            s["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["state"] == "running" && t["worker"] == "w1")
        },
    );
    let held = st["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["worker"] == "w1")
        .unwrap()["index"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    w1.kill();
    let w2 = worker(&etcd, "w2", d, &[]);
    let logs = || format!("{}\n{}", c.log(), w2.log());
    let st = wait_for(
        &url,
        &id,
        "the job to finish",
        Duration::from_secs(90),
        &logs,
        |s| s["state"] != "running",
    );
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", logs());
    let t = &st["tasks"][held as usize];
    assert_eq!(t["attempts"], 2, "the stalled task ran again: {t}");
    assert_eq!(t["worker"], "w2");
    assert_same_dir(&d.join("local/out"), &d.join("dist/out"));
    // no part files of the killed attempt are left behind... except that
    // attempt's own temporary, which the killed process could not remove
    let leftovers: Vec<String> = std::fs::read_dir(d.join("dist/out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_new_coordinator_resumes_without_redoing_finished_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = family(d);
    local_merge(&cfg, &d.join("local/out"));
    let etcd = Etcd::start(d);
    let (mut c1, url1) = coordinator(&etcd, "coord1", d);
    let w = worker(&etcd, "w1", d, &[("SMELT_CHAOS_TASK_DELAY_MS", "700")]);
    let id = submit_job(&url1, &cfg, &d.join("dist/out"));
    let logs = || format!("{}\n{}", c1.log(), w.log());
    let before = wait_for(
        &url1,
        &id,
        "two tasks done",
        Duration::from_secs(60),
        &logs,
        |s| s["tasks_done"].as_u64().unwrap() >= 2,
    );
    c1.kill();
    let done_before: Vec<u64> = before["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "done")
        .map(|t| t["index"].as_u64().unwrap())
        .collect();
    assert!(
        before["state"] == "running",
        "finished too early: {before:#}"
    );
    let (c2, url2) = coordinator(&etcd, "coord2", d);
    let logs = || format!("{}\n{}", c2.log(), w.log());
    let st = wait_for(
        &url2,
        &id,
        "the job to finish",
        Duration::from_secs(90),
        &logs,
        |s| s["state"] != "running",
    );
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", logs());
    for k in &done_before {
        let t = &st["tasks"][*k as usize];
        assert_eq!(
            t["attempts"], 1,
            "task {k} finished before the failover was redone: {t}"
        );
    }
    assert_same_dir(&d.join("local/out"), &d.join("dist/out"));
}

#[test]
fn the_job_survives_an_etcd_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = family(d);
    local_merge(&cfg, &d.join("local/out"));
    let mut etcd = Etcd::start(d);
    let (c, url) = coordinator(&etcd, "coord", d);
    let w = worker(&etcd, "w1", d, &[("SMELT_CHAOS_TASK_DELAY_MS", "500")]);
    let id = submit_job(&url, &cfg, &d.join("dist/out"));
    let logs = || format!("{}\n{}", c.log(), w.log());
    wait_for(
        &url,
        &id,
        "a task done",
        Duration::from_secs(60),
        &logs,
        |s| s["tasks_done"].as_u64().unwrap() >= 1,
    );
    etcd.restart();
    let st = wait_for(
        &url,
        &id,
        "the job to finish",
        Duration::from_secs(120),
        &logs,
        |s| s["state"] != "running",
    );
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", logs());
    assert_same_dir(&d.join("local/out"), &d.join("dist/out"));
}

#[test]
fn bad_submissions_are_refused_and_cancel_stops_a_job() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = family(d);
    let etcd = Etcd::start(d);
    let (c, url) = coordinator(&etcd, "coord", d);
    // a config error names the field
    let bad = d.join("bad.yml");
    std::fs::write(
        &bad,
        "models:\n  - model: fam/ft1\nmerge_method: linear_typo\n",
    )
    .unwrap();
    let o = submit(&url, &bad, &d.join("x"), false);
    assert!(!o.status.success());
    assert!(o.stdout.is_empty(), "no job id for a refused job");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("merge_method"), "{err}\n{}", c.log());
    // a non-empty output needs --overwrite
    std::fs::create_dir_all(d.join("full")).unwrap();
    std::fs::write(d.join("full/keep.txt"), "x").unwrap();
    let o = submit(&url, &cfg, &d.join("full"), false);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert!(d.join("full/keep.txt").exists());
    // cancel: a slow worker, cancel, state cancelled, no index written
    let w = worker(&etcd, "w1", d, &[("SMELT_CHAOS_TASK_DELAY_MS", "1000")]);
    let id = submit_job(&url, &cfg, &d.join("cancelled"));
    let o = smelt()
        .args(["cancel", "--coordinator", &url, &id])
        .output()
        .unwrap();
    assert_ok(&o);
    let logs = || format!("{}\n{}", c.log(), w.log());
    let st = wait_for(
        &url,
        &id,
        "cancelled",
        Duration::from_secs(10),
        &logs,
        |s| s["state"] == "cancelled",
    );
    assert!(st["tasks_done"].as_u64().unwrap() < st["tasks_total"].as_u64().unwrap());
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!d.join("cancelled/model.safetensors.index.json").exists());
    // the unknown job is an error
    let o = smelt()
        .args(["status", "--coordinator", &url, "nope"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

/// Uploads the models under `dir` named `names` to `models/<name>` on `s3`
/// and returns their URLs.
fn upload_models(s3: &S3Server, dir: &Path, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| {
            upload_dir(&s3.store(), &dir.join(n), &format!("models/{n}"));
            s3.url(&format!("models/{n}"))
        })
        .collect()
}

/// `smelt merge` of `cfg` into `out` (a URL) in this process's environment
/// plus `env`.
fn merge_to_url(cfg: &Path, out: &str, env: &[(String, String)], args: &[&str]) {
    let o = smelt()
        .arg("merge")
        .arg(cfg)
        .arg(out)
        .arg("--quiet")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert_ok(&o);
}

fn submit_url(coord: &str, cfg: &Path, out: &str, args: &[&str]) -> std::process::Output {
    smelt()
        .args(["submit", "--coordinator", coord])
        .arg(cfg)
        .arg(out)
        .args(args)
        .arg("--wait")
        .output()
        .unwrap()
}

fn assert_same_objects(s3: &S3Server, a: &str, b: &str) {
    let (x, y) = (read_folder(&s3.store(), a), read_folder(&s3.store(), b));
    assert_eq!(
        x.keys().collect::<Vec<_>>(),
        y.keys().collect::<Vec<_>>(),
        "object lists differ"
    );
    for (name, bytes) in &x {
        assert!(y[name] == *bytes, "{name} differs between {a} and {b}");
    }
}

/// Inputs and output on S3 (s3s-fs), coordinator + 2 workers: a conformance
/// case, and a multi-shard bf16 dare_ties merge whose shards are multipart
/// uploads, the latter with every process talking to S3 through a proxy
/// that fails 5 % of requests. Both byte-identical to `smelt merge`.
#[test]
fn s3_inputs_and_outputs_match_the_local_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s3 = S3Server::start();
    let env = s3.env();

    // a conformance case (ties over 3 fine-tunes)
    let conf = common::repo().join("tests/conformance");
    let urls = upload_models(
        &s3,
        &conf.join("models"),
        &["llama_base", "llama_ft1", "llama_ft2", "llama_ft3"],
    );
    let text = std::fs::read_to_string(conf.join("cases/ties_basic/config.yml")).unwrap();
    let prefix = urls[0].trim_end_matches("llama_base");
    let text = text.replace("../../models/", prefix);
    assert!(text.contains("s3://"), "{text}");
    let conf_cfg = d.join("ties.yml");
    std::fs::write(&conf_cfg, &text).unwrap();
    merge_to_url(&conf_cfg, &s3.url("local/ties"), &env, &[]);

    // a multi-shard bf16 family: 2 output shards of ~6 MB, multipart
    let spec = LlamaSpec {
        layers: 4,
        hidden: 256,
        intermediate: 1024,
        vocab: 4096,
        heads: 4,
        kv_heads: 2,
        dtype: DType::BF16,
        lm_head: true,
        shard_bytes: 3_000_000,
    };
    write_family(&d.join("fam"), &spec, 9, 2, 0.02).unwrap();
    let urls = upload_models(&s3, &d.join("fam"), &["base", "ft1", "ft2"]);
    let big_cfg = d.join("dare.yml");
    std::fs::write(
        &big_cfg,
        format!(
            "models:\n  - model: {}\n    parameters: {{weight: 0.7, density: 0.6}}\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: dare_ties\nbase_model: {}\ndtype: bfloat16\n",
            urls[1], urls[2], urls[0]
        ),
    )
    .unwrap();
    let big_args = ["--out-shard-size", "6M", "--random-seed", "11"];
    let part = [("SMELT_UPLOAD_PART_SIZE".to_string(), (5 << 20).to_string())];
    let env_part: Vec<(String, String)> = env.iter().chain(&part).cloned().collect();
    merge_to_url(&big_cfg, &s3.url("local/dare"), &env_part, &big_args);

    let etcd = Etcd::start(d);
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", s3.port).parse().unwrap(),
        ProxyConfig::default(),
    );
    let faulty: Vec<(String, String)> = s3
        .env_via(&proxy.endpoint())
        .into_iter()
        .chain(part)
        .collect();
    let (c, url) = coordinator_env(&etcd, "coord", d, &faulty);
    let w1 = worker_env(&etcd, "w1", d, &faulty);
    let w2 = worker_env(&etcd, "w2", d, &faulty);
    let logs = || format!("{}\n{}\n{}", c.log(), w1.log(), w2.log());

    let o = submit_url(&url, &conf_cfg, &s3.url("cluster/ties"), &[]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        logs()
    );
    assert_same_objects(&s3, "local/ties", "cluster/ties");

    let o = submit_url(&url, &big_cfg, &s3.url("cluster/dare"), &big_args);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        logs()
    );
    let st = status(&url, &job_id(&o)).expect("status");
    assert!(st["tasks"].as_array().unwrap().len() >= 2, "{st:#}");
    assert_same_objects(&s3, "local/dare", "cluster/dare");
    let objs = read_folder(&s3.store(), "cluster/dare");
    assert!(
        objs.contains_key("model.safetensors.index.json")
            && objs.keys().filter(|k| k.ends_with(".safetensors")).count() >= 2,
        "{:?}",
        objs.keys()
    );
    assert!(
        proxy.stats.faults() > 0,
        "no faults injected in {} requests",
        proxy.stats.requests.load(Ordering::Relaxed)
    );
    assert!(s3.open_uploads().is_empty(), "{:?}", s3.open_uploads());

    // cancel mid-upload: a slow worker has the multipart upload of a
    // one-shard output open (5 MiB parts of ~12 MB); after the cancel it is
    // aborted: no upload left open, and the shard never appears (had the
    // upload been completed instead, the shard would exist)
    drop((w1, w2));
    let slow: Vec<(String, String)> = faulty
        .iter()
        .cloned()
        .chain([(
            "SMELT_CHAOS_TENSOR_DELAY_MS".to_string(),
            "1000".to_string(),
        )])
        .collect();
    let w3 = worker_env(&etcd, "w3", d, &slow);
    let o = smelt()
        .args(["submit", "--coordinator", &url])
        .arg(&big_cfg)
        .arg(s3.url("cluster/cancelled"))
        .args(["--out-shard-size", "50M", "--random-seed", "11"])
        .output()
        .unwrap();
    assert_ok(&o);
    let id = job_id(&o);
    let deadline = Instant::now() + Duration::from_secs(60);
    while s3.open_uploads().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no upload opened\n{}\n{}",
            c.log(),
            w3.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ok(
        &smelt()
            .args(["cancel", "--coordinator", &url, &id])
            .output()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s3.open_uploads().is_empty() {
        assert!(
            Instant::now() < deadline,
            "uploads still open after the cancel: {:?}\n{}",
            s3.open_uploads(),
            w3.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = status(&url, &id).expect("status");
    assert_eq!(st["state"], "cancelled", "{st:#}");
    std::thread::sleep(Duration::from_millis(2500));
    let left = read_folder(&s3.store(), "cluster/cancelled");
    assert!(
        left.contains_key("config.json") && !left.keys().any(|k| k.ends_with(".safetensors")),
        "the cancelled upload completed: {:?}",
        left.keys()
    );

    // a non-empty S3 output is refused without --overwrite, named
    let o = submit_url(&url, &conf_cfg, &s3.url("cluster/ties"), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--overwrite") && err.contains("cluster/ties"),
        "{err}"
    );
}
