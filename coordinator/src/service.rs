//! The coordinator process: campaigns for leadership in etcd; the leader
//! plans submitted merges, hands tasks to workers, requeues the tasks of
//! workers whose lease expired, and finalises outputs. Followers forward
//! client calls to the leader. Every state change is written to etcd
//! (fenced by the leader key) before it is acknowledged.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use smelt_core::Error;
use smelt_proto as pb;
use tokio::sync::{Mutex, RwLock, watch};
use tonic::{Request, Response, Status};

use crate::etcd::{self, Lease};
use crate::keys;
use crate::output::{INDEX, OutputLocation};
use crate::registry::{JobSpec, JobState, Registry, Reported, Settings, Writes, status_of};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// etcd endpoints, comma-separated.
    pub etcd: String,
    /// Address to serve gRPC on.
    pub grpc: SocketAddr,
    /// URL other processes reach this one at (e.g. http://10.0.0.5:50051).
    pub advertise: String,
    /// Lease TTL in seconds for the leader key (how fast a dead leader is
    /// replaced).
    pub lease_ttl: i64,
}

struct Leading {
    reg: Mutex<Registry>,
    fence: Vec<u8>,
    finalizing: Mutex<HashSet<String>>,
    deposed: std::sync::atomic::AtomicBool,
}

/// One coordinator process.
pub struct Node {
    cfg: CoordinatorConfig,
    etcd: Client,
    leading: RwLock<Option<Arc<Leading>>>,
    changed: watch::Sender<u64>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn new_job_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("j{:011x}{:04x}", now_ms(), h.finish() & 0xffff)
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Node {
    /// Connects to etcd and starts campaigning (in the background).
    pub async fn start(cfg: CoordinatorConfig) -> smelt_core::Result<Arc<Node>> {
        let etcd = etcd::connect(&cfg.etcd).await?;
        let (changed, _) = watch::channel(0u64);
        let node = Arc::new(Node {
            cfg,
            etcd,
            leading: RwLock::new(None),
            changed,
        });
        let n = node.clone();
        tokio::spawn(async move { n.lead_loop().await });
        Ok(node)
    }

    /// Serves gRPC until the process ends.
    pub async fn serve(self: Arc<Node>) -> smelt_core::Result<()> {
        let max = pb::MAX_MESSAGE_BYTES;
        let addr = self.cfg.grpc;
        tonic::transport::Server::builder()
            .add_service(
                pb::jobs_server::JobsServer::new(Api(self.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                pb::tasks_server::TasksServer::new(Api(self.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(pb::health_server::HealthServer::new(Api(self.clone())))
            .serve(addr)
            .await
            .map_err(|e| Error::msg(format!("gRPC server on {addr}: {e}")))
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    async fn lead_loop(self: Arc<Node>) {
        loop {
            let lease = match Lease::grant(&self.etcd, self.cfg.lease_ttl).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("coordinator: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let fence = tokio::select! {
                r = etcd::campaign(&self.etcd, keys::ELECTION, &self.cfg.advertise, lease.id) => r,
                _ = lease.wait_lost() => continue,
            };
            let fence = match fence {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("coordinator: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let kvs = loop {
                match etcd::get_prefix(&self.etcd, keys::JOBS).await {
                    Ok(kvs) => break kvs,
                    Err(e) => {
                        tracing::warn!("coordinator: loading jobs: {e}");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            };
            let (reg, skipped) = Registry::load(&kvs);
            for id in skipped {
                tracing::warn!(
                    "job {id}: incomplete in etcd (leader died while submitting); ignored"
                );
            }
            tracing::info!(
                "coordinator {}: leader ({} jobs)",
                self.cfg.advertise,
                reg.jobs.len()
            );
            let lead = Arc::new(Leading {
                reg: Mutex::new(reg),
                fence,
                finalizing: Mutex::new(HashSet::new()),
                deposed: false.into(),
            });
            *self.leading.write().await = Some(lead.clone());
            self.bump();
            while !lease.lost() && !lead.deposed.load(std::sync::atomic::Ordering::SeqCst) {
                self.sweep(&lead).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            tracing::warn!("coordinator {}: lost leadership", self.cfg.advertise);
            *self.leading.write().await = None;
            self.bump();
        }
    }

    /// Requeues tasks of vanished workers; finalises finished jobs.
    async fn sweep(self: &Arc<Node>, lead: &Arc<Leading>) {
        if let Ok(kvs) = etcd::get_prefix(&self.etcd, keys::WORKERS).await {
            let live: HashSet<String> = kvs
                .iter()
                .filter_map(|(k, _)| k.strip_prefix(keys::WORKERS).map(str::to_string))
                .collect();
            let mut reg = lead.reg.lock().await;
            let (moved, w) = reg.requeue_lost(&live);
            if !moved.is_empty() {
                for (j, k) in &moved {
                    tracing::warn!("job {j}: task {k} requeued (its worker is gone)");
                }
                if self.persist(lead, w).await.is_ok() {
                    self.bump();
                }
            }
        }
        let ready = lead.reg.lock().await.ready_to_finalise();
        for id in ready {
            self.spawn_finalise(lead.clone(), id).await;
        }
    }

    async fn spawn_finalise(self: &Arc<Node>, lead: Arc<Leading>, id: String) {
        if !lead.finalizing.lock().await.insert(id.clone()) {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            let (plan, out) = {
                let reg = lead.reg.lock().await;
                let Some(j) = reg.jobs.get(&id) else { return };
                (j.plan.clone(), j.spec.out_url.clone())
            };
            let job_id = id.clone();
            let res = tokio::task::spawn_blocking(move || -> smelt_core::Result<()> {
                let out = OutputLocation::parse(&out)?;
                // part files of attempts whose worker died mid-write
                out.remove_parts(&job_id);
                if let Some(index) = plan.index_json() {
                    out.put(INDEX, &smelt_core::output::pretty_json(&index))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| Error::msg(e.to_string()))
            .and_then(|r| r);
            let mut reg = lead.reg.lock().await;
            let w = match res {
                Ok(()) => reg.finish(&id, JobState::Succeeded, "", now_ms()),
                Err(e) => reg.finish(
                    &id,
                    JobState::Failed,
                    &format!("writing the index: {e}"),
                    now_ms(),
                ),
            };
            if node.persist(&lead, w).await.is_ok() {
                tracing::info!("job {id}: finished");
                node.bump();
            }
            drop(reg);
            lead.finalizing.lock().await.remove(&id);
        });
    }

    /// Makes `w` durable. Retries while etcd is unreachable (e.g. restarting);
    /// steps down if the fence is gone or etcd stays away for 60 s, so the
    /// in-memory table never drifts from etcd for long.
    async fn persist(&self, lead: &Leading, w: Writes) -> Result<(), Status> {
        if w.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match etcd::fenced_put(&self.etcd, &lead.fence, &w).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    lead.deposed
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    return Err(Status::unavailable(
                        "this coordinator is no longer the leader",
                    ));
                }
                Err(e) => {
                    if tokio::time::Instant::now() > deadline {
                        lead.deposed
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        return Err(Status::unavailable(format!("etcd unreachable: {e}")));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn leading(&self) -> Option<Arc<Leading>> {
        let l = self.leading.read().await.clone()?;
        (!l.deposed.load(std::sync::atomic::Ordering::SeqCst)).then_some(l)
    }

    async fn leader_url(&self) -> Result<String, Status> {
        match etcd::leader(&self.etcd, keys::ELECTION).await {
            Ok(Some(u)) if u != self.cfg.advertise => Ok(u),
            Ok(Some(_)) => Err(Status::unavailable(
                "this coordinator is being elected leader; retry",
            )),
            Ok(None) => Err(Status::unavailable("no coordinator is leader yet; retry")),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn forward(
        &self,
    ) -> Result<pb::jobs_client::JobsClient<tonic::transport::Channel>, Status> {
        let url = self.leader_url().await?;
        let c = pb::jobs_client::JobsClient::connect(url.clone())
            .await
            .map_err(|e| Status::unavailable(format!("leader {url}: {e}")))?;
        Ok(c.max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(pb::MAX_MESSAGE_BYTES))
    }

    async fn submit_here(
        self: &Arc<Node>,
        lead: Arc<Leading>,
        req: pb::SubmitRequest,
    ) -> Result<pb::SubmitReply, Status> {
        let settings = Settings::from(&req.settings.unwrap_or_default());
        let out = OutputLocation::parse(&req.out_url)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let s2 = settings.clone();
        let r2 = req.clone();
        let (plan, warnings) = tokio::task::spawn_blocking(
            move || -> Result<(smelt_core::MergePlan, Vec<String>), Status> {
                let mut plan_opts = smelt_core::PlanOptions {
                    allow_crimes: s2.allow_crimes,
                    ..Default::default()
                };
                if s2.out_shard_size != 0 {
                    plan_opts.out_shard_size = s2.out_shard_size;
                }
                if let Some(seed) = s2.random_seed {
                    plan_opts.random_seed = seed;
                }
                let mut mopts = smelt_core::MergeOptions {
                    plan: plan_opts.clone(),
                    overwrite: s2.overwrite,
                    copy_tokenizer: !s2.no_copy_tokenizer,
                    write_model_card: !s2.no_model_card,
                    strict: s2.strict,
                    ..Default::default()
                };
                if s2.memory_budget > 0 {
                    mopts.memory_budget = s2.memory_budget;
                }
                let checked = smelt_core::check::check_text(
                    &r2.config_yaml,
                    &r2.config_name,
                    std::path::Path::new(&r2.base_dir),
                    &smelt_core::check::CheckOptions {
                        plan: plan_opts,
                        strict: s2.strict,
                        out: None,
                        memory_budget: mopts.memory_budget,
                    },
                );
                let messages: Vec<String> = checked
                    .report
                    .problems
                    .iter()
                    .map(|p| p.message.clone())
                    .collect();
                let (Some(config), Some(mut plan), true) =
                    (checked.config, checked.plan, checked.report.ok)
                else {
                    let errors: Vec<String> = checked
                        .report
                        .problems
                        .iter()
                        .filter(|p| p.severity == smelt_core::check::Severity::Error)
                        .map(|p| p.message.clone())
                        .collect();
                    return Err(Status::invalid_argument(errors.join("\n")));
                };
                if let Some(m) = plan.models.iter().find(|m| m.reference.lora.is_some()) {
                    return Err(Status::invalid_argument(format!(
                        "model {}: LoRA adapters (model+lora) are not supported by cluster jobs yet; merge the adapter first or use smelt merge",
                        m.reference
                    )));
                }
                plan.warnings = messages.clone();
                out.prepare(s2.overwrite)
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                let aux =
                    smelt_core::side_files(&config, &checked.models, &plan, &out.name(), &mopts)
                        .map_err(internal)?;
                for (name, bytes) in aux {
                    out.put(&name, &bytes).map_err(internal)?;
                }
                Ok((plan, messages))
            },
        )
        .await
        .map_err(internal)??;
        let id = new_job_id();
        let spec = JobSpec {
            config_yaml: req.config_yaml,
            config_name: req.config_name,
            base_dir: req.base_dir,
            out_url: req.out_url,
            settings,
            created_ms: now_ms(),
        };
        let mut reg = lead.reg.lock().await;
        let w = reg.insert(id.clone(), spec, plan);
        if let Err(e) = self.persist(&lead, w).await {
            reg.jobs.remove(&id);
            return Err(e);
        }
        drop(reg);
        tracing::info!("job {id}: submitted");
        self.bump();
        Ok(pb::SubmitReply {
            job_id: id,
            warnings,
        })
    }
}

/// The gRPC face of a [`Node`].
#[derive(Clone)]
pub struct Api(pub Arc<Node>);

impl std::ops::Deref for Api {
    type Target = Arc<Node>;
    fn deref(&self) -> &Arc<Node> {
        &self.0
    }
}

type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for Api {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        match self.leading().await {
            Some(l) => self
                .submit_here(l, req.into_inner())
                .await
                .map(Response::new),
            None => self.forward().await?.submit(req.into_inner()).await,
        }
    }

    async fn get(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobStatus>, Status> {
        match self.leading().await {
            Some(l) => {
                let id = req.into_inner().job_id;
                l.reg
                    .lock()
                    .await
                    .status(&id)
                    .map(Response::new)
                    .ok_or_else(|| Status::not_found(format!("no job {id}")))
            }
            None => self.forward().await?.get(req.into_inner()).await,
        }
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        match self.leading().await {
            Some(l) => {
                let reg = l.reg.lock().await;
                Ok(Response::new(pb::ListReply {
                    jobs: reg.jobs.values().map(status_of).collect(),
                }))
            }
            None => self.forward().await?.list(req.into_inner()).await,
        }
    }

    async fn cancel(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobStatus>, Status> {
        match self.leading().await {
            Some(l) => {
                let id = req.into_inner().job_id;
                let mut reg = l.reg.lock().await;
                if !reg.jobs.contains_key(&id) {
                    return Err(Status::not_found(format!("no job {id}")));
                }
                let w = reg.finish(&id, JobState::Cancelled, "cancelled", now_ms());
                self.persist(&l, w).await?;
                self.bump();
                Ok(Response::new(reg.status(&id).expect("exists")))
            }
            None => self.forward().await?.cancel(req.into_inner()).await,
        }
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::JobRef>) -> Result<Response<Self::WatchStream>, Status> {
        let id = req.into_inner().job_id;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let node = self.0.clone();
        tokio::spawn(async move {
            let mut last: Option<pb::JobStatus> = None;
            let mut changes = node.changed.subscribe();
            loop {
                let st = match node.leading().await {
                    Some(l) => l
                        .reg
                        .lock()
                        .await
                        .status(&id)
                        .ok_or_else(|| Status::not_found(format!("no job {id}"))),
                    None => match node.forward().await {
                        Ok(mut c) => c
                            .get(pb::JobRef { job_id: id.clone() })
                            .await
                            .map(|r| r.into_inner()),
                        Err(e) => Err(e),
                    },
                };
                match st {
                    Ok(st) => {
                        let finished = st.state != pb::JobState::Running as i32;
                        if last.as_ref() != Some(&st) {
                            if tx.send(Ok(st.clone())).await.is_err() {
                                return;
                            }
                            last = Some(st);
                        }
                        if finished {
                            return;
                        }
                    }
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    // leader changing: keep watching
                    Err(_) => {}
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), changes.changed()).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tonic::async_trait]
impl pb::tasks_server::Tasks for Api {
    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireReply>, Status> {
        let req = req.into_inner();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(req.wait_ms.min(30_000) as u64);
        let mut changes = self.changed.subscribe();
        loop {
            let Some(l) = self.leading().await else {
                return Err(Status::unavailable("not the leader"));
            };
            {
                let mut reg = l.reg.lock().await;
                if let Some((task, w)) = reg.acquire(&req.worker_id) {
                    self.persist(&l, w).await?;
                    drop(reg);
                    tracing::info!(
                        "job {}: task {} (attempt {}) to worker {}",
                        task.job_id,
                        task.task_index,
                        task.attempt,
                        req.worker_id
                    );
                    self.bump();
                    return Ok(Response::new(pb::AcquireReply { task: Some(task) }));
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Response::new(pb::AcquireReply { task: None }));
            }
            let _ = tokio::time::timeout(
                (deadline - now).min(Duration::from_millis(500)),
                changes.changed(),
            )
            .await;
        }
    }

    async fn alive(&self, req: Request<pb::TaskRef>) -> Result<Response<pb::AliveReply>, Status> {
        let Some(l) = self.leading().await else {
            return Err(Status::unavailable("not the leader"));
        };
        let alive = l.reg.lock().await.alive(&req.into_inner());
        Ok(Response::new(pb::AliveReply { alive }))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportReply>, Status> {
        let Some(l) = self.leading().await else {
            return Err(Status::unavailable("not the leader"));
        };
        let req = req.into_inner();
        let mut reg = l.reg.lock().await;
        let (res, w) = reg.report(&req, now_ms());
        self.persist(&l, w).await?;
        drop(reg);
        if let Some(t) = &req.task {
            if req.ok {
                tracing::info!("job {}: task {} done", t.job_id, t.task_index);
            } else {
                tracing::warn!(
                    "job {}: task {} failed: {}",
                    t.job_id,
                    t.task_index,
                    req.error
                );
            }
        }
        self.bump();
        if res == Reported::AllDone
            && let Some(t) = &req.task
        {
            self.spawn_finalise(l, t.job_id.clone()).await;
        }
        Ok(Response::new(pb::ReportReply {
            accepted: res != Reported::Rejected,
        }))
    }
}

#[tonic::async_trait]
impl pb::health_server::Health for Api {
    async fn check(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        let leader = self.leading().await.is_some();
        let leader_addr = if leader {
            self.cfg.advertise.clone()
        } else {
            etcd::leader(&self.etcd, keys::ELECTION)
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        Ok(Response::new(pb::HealthReply {
            leader,
            leader_addr,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}
