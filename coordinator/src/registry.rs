//! The leader's job table: jobs, their tasks and every state transition.
//! Pure logic (no I/O): each mutation returns the etcd writes that make it
//! durable, so a new leader that loads those keys resumes exactly here.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smelt_core::plan::MergePlan;
use smelt_proto as pb;

use crate::{WorkItem, keys, split_plan};

/// Attempts a task gets before an error fails its job (lost workers do not
/// count as errors, but every start is an attempt).
pub const MAX_ERROR_ATTEMPTS: u32 = 3;

/// Merge options of a job (the gRPC `MergeSettings`, stored as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub out_shard_size: i64,
    pub random_seed: Option<u64>,
    pub allow_crimes: bool,
    pub overwrite: bool,
    pub no_copy_tokenizer: bool,
    pub no_model_card: bool,
    pub memory_budget: u64,
    pub strict: bool,
}

impl From<&pb::MergeSettings> for Settings {
    fn from(s: &pb::MergeSettings) -> Self {
        Settings {
            out_shard_size: s.out_shard_size,
            random_seed: s.random_seed,
            allow_crimes: s.allow_crimes,
            overwrite: s.overwrite,
            no_copy_tokenizer: s.no_copy_tokenizer,
            no_model_card: s.no_model_card,
            memory_budget: s.memory_budget,
            strict: s.strict,
        }
    }
}

impl From<&Settings> for pb::MergeSettings {
    fn from(s: &Settings) -> Self {
        pb::MergeSettings {
            out_shard_size: s.out_shard_size,
            random_seed: s.random_seed,
            allow_crimes: s.allow_crimes,
            overwrite: s.overwrite,
            no_copy_tokenizer: s.no_copy_tokenizer,
            no_model_card: s.no_model_card,
            memory_budget: s.memory_budget,
            strict: s.strict,
        }
    }
}

/// What was submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub config_yaml: String,
    pub config_name: String,
    pub base_dir: String,
    pub out_url: String,
    pub settings: Settings,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn finished(self) -> bool {
        self != JobState::Running
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub state: JobState,
    pub error: String,
    pub finished_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Pending,
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub state: TaskState,
    pub attempts: u32,
    /// Attempts that ended in an error reported by a worker.
    #[serde(default)]
    pub errors: u32,
    pub worker: String,
    pub error: String,
    pub bytes: u64,
}

impl TaskRecord {
    fn new() -> Self {
        TaskRecord {
            state: TaskState::Pending,
            attempts: 0,
            errors: 0,
            worker: String::new(),
            error: String::new(),
            bytes: 0,
        }
    }
}

/// One job as the leader holds it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub plan: Arc<MergePlan>,
    pub plan_json: Arc<Vec<u8>>,
    pub digest: String,
    pub items: Vec<WorkItem>,
    pub tasks: Vec<TaskRecord>,
    pub rec: JobRecord,
}

/// Key/value writes that make a transition durable.
pub type Writes = Vec<(String, Vec<u8>)>;

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

/// A 64-bit FNV-1a digest in hex: identifies a plan's bytes for caching.
pub fn digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}-{}", bytes.len())
}

/// What a report led to.
#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    /// Not the current attempt (stale worker, cancelled job): ignored.
    Rejected,
    Accepted,
    /// Every task is done: the output needs its index and the job closing.
    AllDone,
}

#[derive(Debug, Default)]
pub struct Registry {
    pub jobs: BTreeMap<String, Job>,
}

impl Registry {
    /// Adds a planned job. Returns the writes that persist it.
    pub fn insert(&mut self, id: String, spec: JobSpec, plan: MergePlan) -> Writes {
        let plan_json = json(&plan);
        let items = split_plan(&plan);
        let tasks = items.iter().map(|_| TaskRecord::new()).collect();
        let job = Job {
            id: id.clone(),
            spec,
            digest: digest(&plan_json),
            plan: Arc::new(plan),
            plan_json: Arc::new(plan_json),
            items,
            tasks,
            rec: JobRecord {
                state: JobState::Running,
                error: String::new(),
                finished_ms: 0,
            },
        };
        let mut w: Writes = vec![
            (keys::job_spec(&id), json(&job.spec)),
            (keys::job_plan(&id), (*job.plan_json).clone()),
        ];
        for (k, t) in job.tasks.iter().enumerate() {
            w.push((keys::job_task(&id, k), json(t)));
        }
        // the state key last: a job whose state key exists is complete
        w.push((keys::job_state(&id), json(&job.rec)));
        self.jobs.insert(id, job);
        w
    }

    /// Rebuilds the table from the keys under [`keys::JOBS`]. Jobs missing
    /// any part (a leader died mid-submit) are skipped and listed.
    pub fn load(kvs: &[(String, Vec<u8>)]) -> (Registry, Vec<String>) {
        let mut parts: BTreeMap<String, BTreeMap<String, &[u8]>> = BTreeMap::new();
        for (k, v) in kvs {
            if let Some(rest) = k.strip_prefix(keys::JOBS)
                && let Some((id, part)) = rest.split_once('/')
            {
                parts
                    .entry(id.to_string())
                    .or_default()
                    .insert(part.to_string(), v);
            }
        }
        let mut reg = Registry::default();
        let mut skipped = Vec::new();
        for (id, p) in parts {
            match Self::load_job(&id, &p) {
                Some(job) => {
                    reg.jobs.insert(id, job);
                }
                None => skipped.push(id),
            }
        }
        (reg, skipped)
    }

    fn load_job(id: &str, p: &BTreeMap<String, &[u8]>) -> Option<Job> {
        let spec: JobSpec = serde_json::from_slice(p.get("spec")?).ok()?;
        let plan_json = p.get("plan")?.to_vec();
        let plan: MergePlan = serde_json::from_slice(&plan_json).ok()?;
        let rec: JobRecord = serde_json::from_slice(p.get("state")?).ok()?;
        let items = split_plan(&plan);
        let mut tasks = Vec::with_capacity(items.len());
        for k in 0..items.len() {
            let t: TaskRecord = serde_json::from_slice(p.get(&keys::task_part(k))?).ok()?;
            tasks.push(t);
        }
        Some(Job {
            id: id.to_string(),
            spec,
            digest: digest(&plan_json),
            plan: Arc::new(plan),
            plan_json: Arc::new(plan_json),
            items,
            tasks,
            rec,
        })
    }

    /// Hands the first pending task of the oldest running job to `worker`.
    pub fn acquire(&mut self, worker: &str) -> Option<(pb::Task, Writes)> {
        // A worker runs one task at a time and reports it before asking
        // again: a task still recorded as running on a worker that asks is
        // one it never got (a leader died between recording the hand-out
        // and replying) or gave up reporting. It goes back to the queue —
        // else it would wait forever on a worker that is alive.
        let mut orphans = Writes::new();
        for job in self.jobs.values_mut() {
            if job.rec.state != JobState::Running {
                continue;
            }
            for (k, t) in job.tasks.iter_mut().enumerate() {
                if t.state == TaskState::Running && t.worker == worker {
                    t.state = TaskState::Pending;
                    orphans.push((keys::job_task(&job.id, k), json(t)));
                }
            }
        }
        let (task, mut w) = self.hand_out(worker)?;
        orphans.append(&mut w);
        Some((task, orphans))
    }

    /// The next pending task, now running on `worker`.
    fn hand_out(&mut self, worker: &str) -> Option<(pb::Task, Writes)> {
        for job in self.jobs.values_mut() {
            if job.rec.state != JobState::Running {
                continue;
            }
            let Some(k) = job.tasks.iter().position(|t| t.state == TaskState::Pending) else {
                continue;
            };
            let t = &mut job.tasks[k];
            t.state = TaskState::Running;
            t.attempts += 1;
            t.worker = worker.to_string();
            t.error.clear();
            let task = pb::Task {
                job_id: job.id.clone(),
                task_index: k as u32,
                attempt: t.attempts,
                plan_json: (*job.plan_json).clone(),
                plan_digest: job.digest.clone(),
                shards: vec![job.items[k].shard as u32],
                out_url: job.spec.out_url.clone(),
                memory_budget: job.spec.settings.memory_budget,
            };
            let w = vec![(keys::job_task(&job.id, k), json(t))];
            return Some((task, w));
        }
        None
    }

    /// Whether this attempt of the task is still the one wanted.
    pub fn alive(&self, r: &pb::TaskRef) -> bool {
        self.current(r).is_some()
    }

    fn current(&self, r: &pb::TaskRef) -> Option<(&Job, usize)> {
        let job = self.jobs.get(&r.job_id)?;
        let k = r.task_index as usize;
        let t = job.tasks.get(k)?;
        (job.rec.state == JobState::Running
            && t.state == TaskState::Running
            && t.attempts == r.attempt
            && t.worker == r.worker_id)
            .then_some((job, k))
    }

    /// Records a worker's report on a task attempt.
    pub fn report(&mut self, r: &pb::ReportRequest, now_ms: i64) -> (Reported, Writes) {
        let Some(tr) = r.task.as_ref() else {
            return (Reported::Rejected, vec![]);
        };
        if self.current(tr).is_none() {
            return (Reported::Rejected, vec![]);
        }
        let job = self.jobs.get_mut(&tr.job_id).expect("checked");
        let k = tr.task_index as usize;
        let t = &mut job.tasks[k];
        let mut w = Writes::new();
        if r.ok {
            t.state = TaskState::Done;
            t.bytes = r.bytes;
            t.error.clear();
            w.push((keys::job_task(&job.id, k), json(t)));
            if job.tasks.iter().all(|t| t.state == TaskState::Done) {
                return (Reported::AllDone, w);
            }
            return (Reported::Accepted, w);
        }
        t.errors += 1;
        t.error = r.error.clone();
        if t.errors >= MAX_ERROR_ATTEMPTS {
            t.state = TaskState::Failed;
            let msg = format!(
                "task {k} ({}) failed {} times; last error: {}",
                job.items[k].file_name, t.errors, r.error
            );
            w.push((keys::job_task(&job.id, k), json(t)));
            job.rec = JobRecord {
                state: JobState::Failed,
                error: msg,
                finished_ms: now_ms,
            };
            w.push((keys::job_state(&job.id), json(&job.rec)));
        } else {
            t.state = TaskState::Pending;
            w.push((keys::job_task(&job.id, k), json(t)));
        }
        (Reported::Accepted, w)
    }

    /// Puts running tasks of workers that are no longer alive back in the
    /// queue. Returns the (job, task) pairs requeued and the writes.
    pub fn requeue_lost(&mut self, live: &HashSet<String>) -> (Vec<(String, usize)>, Writes) {
        let mut moved = Vec::new();
        let mut w = Writes::new();
        for job in self.jobs.values_mut() {
            if job.rec.state != JobState::Running {
                continue;
            }
            for (k, t) in job.tasks.iter_mut().enumerate() {
                if t.state == TaskState::Running && !live.contains(&t.worker) {
                    t.state = TaskState::Pending;
                    moved.push((job.id.clone(), k));
                    w.push((keys::job_task(&job.id, k), json(t)));
                }
            }
        }
        (moved, w)
    }

    /// Closes a job (succeeded, failed or cancelled). Only running jobs
    /// change; returns the writes.
    pub fn finish(&mut self, id: &str, state: JobState, error: &str, now_ms: i64) -> Writes {
        let Some(job) = self.jobs.get_mut(id) else {
            return vec![];
        };
        if job.rec.state != JobState::Running {
            return vec![];
        }
        job.rec = JobRecord {
            state,
            error: error.to_string(),
            finished_ms: now_ms,
        };
        vec![(keys::job_state(id), json(&job.rec))]
    }

    /// Running jobs whose tasks are all done (to finalise after a leader
    /// change that happened between the last report and the index).
    pub fn ready_to_finalise(&self) -> Vec<String> {
        self.jobs
            .values()
            .filter(|j| {
                j.rec.state == JobState::Running
                    && j.tasks.iter().all(|t| t.state == TaskState::Done)
            })
            .map(|j| j.id.clone())
            .collect()
    }

    pub fn status(&self, id: &str) -> Option<pb::JobStatus> {
        self.jobs.get(id).map(status_of)
    }
}

/// The wire form of a job's status.
pub fn status_of(job: &Job) -> pb::JobStatus {
    let tasks: Vec<pb::TaskStatus> = job
        .tasks
        .iter()
        .enumerate()
        .map(|(k, t)| pb::TaskStatus {
            index: k as u32,
            file_name: job.items[k].file_name.clone(),
            state: match t.state {
                TaskState::Pending => pb::TaskState::Pending,
                TaskState::Running => pb::TaskState::Running,
                TaskState::Done => pb::TaskState::Done,
                TaskState::Failed => pb::TaskState::Failed,
            } as i32,
            attempts: t.attempts,
            worker: t.worker.clone(),
            error: t.error.clone(),
            bytes: t.bytes,
        })
        .collect();
    pb::JobStatus {
        job_id: job.id.clone(),
        state: match job.rec.state {
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        error: job.rec.error.clone(),
        out_url: job.spec.out_url.clone(),
        method: job.plan.method.clone(),
        tasks_total: tasks.len() as u32,
        tasks_done: job
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Done)
            .count() as u32,
        bytes_total: job.items.iter().map(|i| i.bytes).sum(),
        bytes_done: job
            .tasks
            .iter()
            .zip(&job.items)
            .filter(|(t, _)| t.state == TaskState::Done)
            .map(|(_, i)| i.bytes)
            .sum(),
        tasks,
        created_unix_ms: job.spec.created_ms,
        finished_unix_ms: job.rec.finished_ms,
        config_name: job.spec.config_name.clone(),
    }
}
