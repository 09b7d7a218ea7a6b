//! Cluster subcommands: `smelt coordinator`, `smelt worker`, and the client
//! commands `smelt submit`, `smelt status`, `smelt cancel`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::Args;
use smelt_proto as pb;

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long)]
    etcd: String,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "0.0.0.0:50051")]
    grpc: std::net::SocketAddr,
    /// URL workers and other coordinators reach this one at
    /// (default: http://<--grpc>).
    #[arg(long)]
    advertise: Option<String>,
    /// Address for the HTTP API / UI (not served by this build yet).
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Leader lease TTL in seconds.
    #[arg(long, default_value_t = 10)]
    lease_ttl: i64,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long)]
    etcd: String,
    /// Executor threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Worker name (default: hostname-pid).
    #[arg(long)]
    id: Option<String>,
    /// Lease TTL in seconds: a crashed worker's task is requeued this long
    /// after its last keep-alive.
    #[arg(long, default_value_t = 10)]
    lease_ttl: i64,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Coordinator URL (any coordinator; followers forward to the leader).
    #[arg(long)]
    coordinator: String,
    /// The merge configuration (mergekit YAML).
    config: PathBuf,
    /// Output location: a path on storage every worker shares, or a URL.
    out: String,
    /// Maximum shard size in bytes; suffixes K, M, B.
    #[arg(long, default_value = "5B")]
    out_shard_size: String,
    /// Seed for random methods (DARE, DELLA).
    #[arg(long, default_value_t = 0)]
    random_seed: u64,
    #[arg(long)]
    allow_crimes: bool,
    /// Replace a non-empty output.
    #[arg(long)]
    overwrite: bool,
    #[arg(long)]
    no_copy_tokenizer: bool,
    #[arg(long)]
    no_write_model_card: bool,
    /// Working-set cap per task on the workers (e.g. 2B).
    #[arg(long)]
    max_memory: Option<String>,
    /// Treat warnings as errors.
    #[arg(long)]
    strict: bool,
    /// Wait for the job: progress on stderr; exit 0 if it succeeds, 1 if not.
    #[arg(long)]
    wait: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long)]
    coordinator: String,
    /// A job id (default: list every job).
    job: Option<String>,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[arg(long)]
    coordinator: String,
    job: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn run_coordinator(a: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    if a.http.is_some() {
        eprintln!("note: --http: the HTTP API is not part of this build yet; serving gRPC only");
    }
    let advertise = a.advertise.unwrap_or_else(|| format!("http://{}", a.grpc));
    let cfg = smelt_coordinator::CoordinatorConfig {
        etcd: a.etcd,
        grpc: a.grpc,
        advertise,
        lease_ttl: a.lease_ttl.max(1),
    };
    runtime()?.block_on(async move {
        let node = smelt_coordinator::Node::start(cfg).await?;
        node.serve().await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_worker(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let cfg = smelt_worker::WorkerConfig {
        etcd: a.etcd,
        id: a.id.unwrap_or_else(smelt_worker::default_worker_id),
        threads: a.threads.unwrap_or(0),
        lease_ttl: a.lease_ttl.max(1),
    };
    runtime()?.block_on(async move {
        smelt_worker::run_worker(cfg).await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn jobs_client(
    url: &str,
) -> anyhow::Result<pb::jobs_client::JobsClient<tonic::transport::Channel>> {
    // a coordinator that is starting up refuses connections for a moment
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let c = loop {
        match pb::jobs_client::JobsClient::connect(url.to_string()).await {
            Ok(c) => break c,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("cannot reach the coordinator at {url}"));
            }
        }
    };
    Ok(c.max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(pb::MAX_MESSAGE_BYTES))
}

/// Retries a call while no coordinator is leader yet (start-up, failover),
/// for up to 30 s.
async fn retry_unavailable<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match call().await {
            Err(e)
                if e.code() == tonic::Code::Unavailable && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

fn status_err(e: tonic::Status) -> anyhow::Error {
    anyhow!("{}", e.message())
}

/// Whether an output argument is a URL (kept as is) or a local path
/// (made absolute against the current directory).
fn resolve_out(out: &str) -> anyhow::Result<String> {
    if out.contains("://") {
        return Ok(out.to_string());
    }
    let p = PathBuf::from(out);
    let abs = if p.is_absolute() {
        p
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(abs.display().to_string())
}

pub fn run_submit(a: SubmitArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let dir = a
        .config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let base_dir =
        std::fs::canonicalize(&dir).with_context(|| format!("config folder {}", dir.display()))?;
    let memory_budget = match &a.max_memory {
        Some(m) => crate::parse_size(m).map_err(anyhow::Error::msg)?.max(1) as u64,
        None => 0,
    };
    let out_shard_size = crate::parse_size(&a.out_shard_size).map_err(anyhow::Error::msg)?;
    let req = pb::SubmitRequest {
        config_yaml: text,
        config_name: a.config.display().to_string(),
        base_dir: base_dir.display().to_string(),
        out_url: resolve_out(&a.out)?,
        settings: Some(pb::MergeSettings {
            // the wire's 0 means "default"; an explicit 0 means no sharding
            out_shard_size: if out_shard_size == 0 {
                -1
            } else {
                out_shard_size
            },
            random_seed: Some(a.random_seed),
            allow_crimes: a.allow_crimes,
            overwrite: a.overwrite,
            no_copy_tokenizer: a.no_copy_tokenizer,
            no_model_card: a.no_write_model_card,
            memory_budget,
            strict: a.strict,
        }),
    };
    runtime()?.block_on(async move {
        let c = jobs_client(&a.coordinator).await?;
        let reply = retry_unavailable(|| {
            let mut c = c.clone();
            let req = req.clone();
            async move { c.submit(req).await }
        })
        .await
        .map_err(status_err)?
        .into_inner();
        drop(c);
        for w in &reply.warnings {
            eprintln!("warning: {w}");
        }
        println!("{}", reply.job_id);
        if !a.wait {
            return Ok(ExitCode::SUCCESS);
        }
        wait(&a.coordinator, &reply.job_id).await
    })
}

async fn wait(url: &str, id: &str) -> anyhow::Result<ExitCode> {
    // Reconnects through coordinator restarts (the job lives in etcd).
    let mut last_line = String::new();
    loop {
        let stream = match jobs_client(url).await {
            Ok(mut c) => c
                .watch(pb::JobRef {
                    job_id: id.to_string(),
                })
                .await
                .map(|r| r.into_inner()),
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) if e.code() == tonic::Code::NotFound => return Err(status_err(e)),
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Ok(Some(st)) = stream.message().await {
            let line = format!(
                "job {}: {} tasks {}/{} ({} of {} bytes)",
                st.job_id,
                state_name(st.state),
                st.tasks_done,
                st.tasks_total,
                st.bytes_done,
                st.bytes_total
            );
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
            }
            if st.state == pb::JobState::Succeeded as i32 {
                return Ok(ExitCode::SUCCESS);
            }
            if st.state != pb::JobState::Running as i32 {
                if !st.error.is_empty() {
                    eprintln!("error: {}", st.error);
                }
                return Ok(ExitCode::from(1));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Unspecified => "unknown",
    }
}

fn task_state_name(s: i32) -> &'static str {
    match pb::TaskState::try_from(s).unwrap_or(pb::TaskState::Unspecified) {
        pb::TaskState::Pending => "pending",
        pb::TaskState::Running => "running",
        pb::TaskState::Done => "done",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Unspecified => "unknown",
    }
}

fn status_json(st: &pb::JobStatus) -> serde_json::Value {
    serde_json::json!({
        "job_id": st.job_id,
        "state": state_name(st.state),
        "error": st.error,
        "out": st.out_url,
        "method": st.method,
        "config": st.config_name,
        "tasks_total": st.tasks_total,
        "tasks_done": st.tasks_done,
        "bytes_total": st.bytes_total,
        "bytes_done": st.bytes_done,
        "created_unix_ms": st.created_unix_ms,
        "finished_unix_ms": st.finished_unix_ms,
        "tasks": st.tasks.iter().map(|t| serde_json::json!({
            "index": t.index,
            "file": t.file_name,
            "state": task_state_name(t.state),
            "attempts": t.attempts,
            "worker": t.worker,
            "error": t.error,
            "bytes": t.bytes,
        })).collect::<Vec<_>>(),
    })
}

pub fn run_status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let c = jobs_client(&a.coordinator).await?;
        let jobs = match &a.job {
            Some(id) => vec![
                retry_unavailable(|| {
                    let mut c = c.clone();
                    let r = pb::JobRef { job_id: id.clone() };
                    async move { c.get(r).await }
                })
                .await
                .map_err(status_err)?
                .into_inner(),
            ],
            None => {
                retry_unavailable(|| {
                    let mut c = c.clone();
                    async move { c.list(pb::ListRequest {}).await }
                })
                .await
                .map_err(status_err)?
                .into_inner()
                .jobs
            }
        };
        if a.json {
            let v: Vec<serde_json::Value> = jobs.iter().map(status_json).collect();
            let out = if a.job.is_some() {
                v.into_iter().next().unwrap_or_default()
            } else {
                serde_json::Value::Array(v)
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(ExitCode::SUCCESS);
        }
        for st in &jobs {
            println!(
                "{}  {:<9}  {} → {}  tasks {}/{}  {}",
                st.job_id,
                state_name(st.state),
                st.method,
                st.out_url,
                st.tasks_done,
                st.tasks_total,
                st.error
            );
            if a.job.is_some() {
                for t in &st.tasks {
                    println!(
                        "  task {:>4}  {:<8} attempts {}  {}  {}  {}",
                        t.index,
                        task_state_name(t.state),
                        t.attempts,
                        t.file_name,
                        t.worker,
                        t.error
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_cancel(a: CancelArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let c = jobs_client(&a.coordinator).await?;
        let st = retry_unavailable(|| {
            let mut c = c.clone();
            let r = pb::JobRef {
                job_id: a.job.clone(),
            };
            async move { c.cancel(r).await }
        })
        .await
        .map_err(status_err)?
        .into_inner();
        println!("{} {}", st.job_id, state_name(st.state));
        Ok(ExitCode::SUCCESS)
    })
}
