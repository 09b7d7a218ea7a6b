//! The worker: registers in etcd under a lease, finds the leading
//! coordinator through etcd's election, takes tasks (one output shard each),
//! runs them through the same executor as `smelt merge`, and reports back.
//! A worker that dies loses only its current task: its lease expires and the
//! coordinator hands the task to another worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use smelt_coordinator::output::OutputLocation;
use smelt_coordinator::{etcd, keys};
use smelt_core::executor;
use smelt_core::io::{ModelTensors, ShardSink, ShardWriter, TensorSink};
use smelt_core::plan::{MergePlan, ShardPlan};
use smelt_core::{Error, Result};
use smelt_proto as pb;

/// Computes every tensor of the shards `shards` into `writer`.
pub fn run_shards(
    plan: &MergePlan,
    shards: &[usize],
    models: &[ModelTensors],
    writer: &ShardWriter,
    memory_budget: u64,
) -> Result<()> {
    let which: Vec<usize> = shards
        .iter()
        .flat_map(|s| plan.shards[*s].tensors.iter().copied())
        .collect();
    executor::run_tasks(plan, &which, models, writer, memory_budget, &|_, _, _| {})
}

/// The plan restricted to one shard, renumbered so that shard is shard 0 and
/// written under `file_name`.
pub fn shard_plan(plan: &MergePlan, shard: usize, file_name: &str) -> Result<MergePlan> {
    let s = plan.shards.get(shard).ok_or_else(|| {
        Error::msg(format!(
            "task names shard {shard}, the plan has {}",
            plan.shards.len()
        ))
    })?;
    let mut sub = plan.clone();
    sub.tensors = s
        .tensors
        .iter()
        .enumerate()
        .map(|(slot, &i)| {
            let mut t = plan.tensors[i].clone();
            t.shard = 0;
            t.slot = slot;
            t
        })
        .collect();
    sub.shards = vec![ShardPlan {
        file_name: file_name.to_string(),
        tensors: (0..s.tensors.len()).collect(),
    }];
    Ok(sub)
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub etcd: String,
    /// Unique name (shown in job status).
    pub id: String,
    /// Threads for the executor (0: all cores).
    pub threads: usize,
    /// Lease TTL in seconds: how long after a crash its task is requeued.
    pub lease_ttl: i64,
}

/// Opened inputs of one plan, kept while tasks of the same plan come in.
struct Cached {
    digest: String,
    plan: Arc<MergePlan>,
    models: Arc<Vec<ModelTensors>>,
}

/// Runs the worker until the process ends.
pub async fn run_worker(cfg: WorkerConfig) -> Result<()> {
    let client = etcd::connect(&cfg.etcd).await?;
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .build()
            .map_err(|e| Error::msg(format!("thread pool: {e}")))?,
    );
    // registration: keep a lease and our key alive; re-register after loss
    let reg_client = client.clone();
    let reg_cfg = cfg.clone();
    tokio::spawn(async move {
        loop {
            match etcd::Lease::grant(&reg_client, reg_cfg.lease_ttl).await {
                Ok(lease) => {
                    let key = keys::worker(&reg_cfg.id);
                    let info = format!("{{\"threads\":{}}}", reg_cfg.threads);
                    if etcd::put_with_lease(&reg_client, &key, &info, lease.id)
                        .await
                        .is_ok()
                    {
                        tracing::info!("worker {}: registered", reg_cfg.id);
                        lease.wait_lost().await;
                        tracing::warn!("worker {}: lease lost; registering again", reg_cfg.id);
                    }
                }
                Err(e) => tracing::warn!("worker {}: {e}", reg_cfg.id),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut cache: Option<Cached> = None;
    let mut conn: Option<(
        String,
        pb::tasks_client::TasksClient<tonic::transport::Channel>,
    )> = None;
    loop {
        // find (or re-find) the leader
        let url = match etcd::leader(&client, keys::ELECTION).await {
            Ok(Some(u)) => u,
            Ok(None) | Err(_) => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        if conn.as_ref().map(|(u, _)| u != &url).unwrap_or(true) {
            match pb::tasks_client::TasksClient::connect(url.clone()).await {
                Ok(c) => {
                    conn = Some((
                        url.clone(),
                        c.max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(pb::MAX_MESSAGE_BYTES),
                    ))
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            }
        }
        let tasks = &mut conn.as_mut().expect("connected").1;
        let task = match tasks
            .acquire(pb::AcquireRequest {
                worker_id: cfg.id.clone(),
                wait_ms: 2000,
            })
            .await
        {
            Ok(r) => match r.into_inner().task {
                Some(t) => t,
                None => continue,
            },
            Err(_) => {
                conn = None;
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        if let Ok(ms) = std::env::var("SMELT_CHAOS_TASK_DELAY_MS")
            && let Ok(ms) = ms.parse::<u64>()
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let tref = pb::TaskRef {
            job_id: task.job_id.clone(),
            task_index: task.task_index,
            attempt: task.attempt,
            worker_id: cfg.id.clone(),
        };
        let result = run_task(&task, &mut cache, pool.clone(), &client, &tref).await;
        let (ok, error, bytes) = match result {
            Ok(b) => (true, String::new(), b),
            Err(e) => {
                tracing::warn!("job {} task {}: {e}", task.job_id, task.task_index);
                (false, e.to_string(), 0)
            }
        };
        report(&client, &tref, ok, error, bytes).await;
    }
}

/// Reports to whoever leads now, retrying through leader changes for a while.
async fn report(
    client: &etcd_client::Client,
    tref: &pb::TaskRef,
    ok: bool,
    error: String,
    bytes: u64,
) {
    let req = pb::ReportRequest {
        task: Some(tref.clone()),
        ok,
        error,
        bytes,
    };
    for _ in 0..200 {
        if let Ok(Some(url)) = etcd::leader(client, keys::ELECTION).await
            && let Ok(mut c) = pb::tasks_client::TasksClient::connect(url).await
            && let Ok(r) = c.report(req.clone()).await
        {
            if !r.into_inner().accepted {
                tracing::warn!(
                    "job {} task {}: result not accepted (task reassigned or job closed)",
                    tref.job_id,
                    tref.task_index
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn still_wanted(client: &etcd_client::Client, tref: &pb::TaskRef) -> Option<bool> {
    let url = etcd::leader(client, keys::ELECTION).await.ok()??;
    let mut c = pb::tasks_client::TasksClient::connect(url).await.ok()?;
    c.alive(tref.clone())
        .await
        .ok()
        .map(|r| r.into_inner().alive)
}

async fn run_task(
    task: &pb::Task,
    cache: &mut Option<Cached>,
    pool: Arc<rayon::ThreadPool>,
    client: &etcd_client::Client,
    tref: &pb::TaskRef,
) -> Result<u64> {
    let (plan, models) = match cache {
        Some(c) if c.digest == task.plan_digest => (c.plan.clone(), c.models.clone()),
        _ => {
            let plan: MergePlan = serde_json::from_slice(&task.plan_json)
                .map_err(|e| Error::msg(format!("task's plan does not parse: {e}")))?;
            let plan = Arc::new(plan);
            let p2 = plan.clone();
            let models = tokio::task::spawn_blocking(move || -> Result<Vec<ModelTensors>> {
                p2.models.iter().map(|m| m.open()).collect()
            })
            .await
            .map_err(|e| Error::msg(e.to_string()))??;
            let models = Arc::new(models);
            *cache = Some(Cached {
                digest: task.plan_digest.clone(),
                plan: plan.clone(),
                models: models.clone(),
            });
            (plan, models)
        }
    };
    let out = OutputLocation::parse(&task.out_url)?;
    let budget = if task.memory_budget > 0 {
        task.memory_budget
    } else {
        executor::DEFAULT_MEMORY_BUDGET
    };
    let mut written = 0u64;
    for &shard in &task.shards {
        let shard = shard as usize;
        let file = plan
            .shards
            .get(shard)
            .ok_or_else(|| {
                Error::msg(format!(
                    "task names shard {shard}, the plan has {}",
                    plan.shards.len()
                ))
            })?
            .file_name
            .clone();
        let target = out.shard_target(&file, &task.job_id, task.task_index, task.attempt);
        let sub = shard_plan(&plan, shard, target.writing_name())?;
        let cancelled = Arc::new(AtomicBool::new(false));
        let sink = out.open_shard(&target, sub.shard_slots().remove(0).1)?;
        let (m2, pool2, flag) = (models.clone(), pool.clone(), cancelled.clone());
        let job = tokio::task::spawn_blocking(
            move || -> std::result::Result<(Box<dyn ShardSink>, u64), Error> {
                let all: Vec<usize> = (0..sub.tensors.len()).collect();
                let guarded = Guarded {
                    inner: sink.as_ref(),
                    cancelled: &flag,
                };
                let r = pool2.install(|| {
                    executor::run_tasks(&sub, &all, &m2, &guarded, budget, &|_, _, _| {})
                });
                match r {
                    Ok(()) => Ok((sink, sub.total_bytes())),
                    Err(e) => {
                        sink.abort();
                        Err(e)
                    }
                }
            },
        );
        // while it runs, ask whether the task is still wanted; if not, the
        // next write fails and the upload is aborted
        let watch = {
            let (client, tref, flag) = (client.clone(), tref.clone(), cancelled.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if still_wanted(&client, &tref).await == Some(false) {
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            })
        };
        let res = job
            .await
            .map_err(|e| Error::msg(e.to_string()))
            .and_then(|r| r);
        watch.abort();
        match res {
            Ok((sink, b))
                if !cancelled.load(Ordering::SeqCst)
                    && still_wanted(client, tref).await != Some(false) =>
            {
                tokio::task::spawn_blocking(move || sink.finish())
                    .await
                    .map_err(|e| Error::msg(e.to_string()))??;
                out.publish(&target)?;
                written += b;
            }
            Ok((sink, _)) => {
                tokio::task::spawn_blocking(move || sink.abort())
                    .await
                    .map_err(|e| Error::msg(e.to_string()))?;
                out.discard(&target);
                return Err(Error::msg(
                    "task no longer wanted (job cancelled or task reassigned)",
                ));
            }
            Err(e) => {
                out.discard(&target);
                return Err(e);
            }
        }
    }
    Ok(written)
}

/// A sink whose writes fail once the task is no longer wanted, so the
/// executor stops early.
struct Guarded<'a> {
    inner: &'a dyn ShardSink,
    cancelled: &'a AtomicBool,
}

impl Guarded<'_> {
    fn check(&self) -> Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            Err(Error::msg(
                "task no longer wanted (job cancelled or task reassigned)",
            ))
        } else {
            Ok(())
        }
    }
}

impl TensorSink for Guarded<'_> {
    fn write(&self, shard: usize, slot: usize, bytes: &[u8]) -> Result<()> {
        self.check()?;
        self.inner.write(shard, slot, bytes)
    }
    fn write_part(&self, shard: usize, slot: usize, off: u64, bytes: &[u8]) -> Result<()> {
        self.check()?;
        self.inner.write_part(shard, slot, off, bytes)
    }
    fn write_part_owned(&self, shard: usize, slot: usize, off: u64, bytes: Vec<u8>) -> Result<()> {
        self.check()?;
        self.inner.write_part_owned(shard, slot, off, bytes)
    }
    fn rewrites(&self) -> bool {
        self.inner.rewrites()
    }
}

/// A short unique worker name: host-pid.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}
