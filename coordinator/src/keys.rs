//! etcd key layout (all under `/smelt/v1/`).

/// Prefix of every job's keys: `JOBS{id}/spec|plan|state|task/NNNNNN`.
pub const JOBS: &str = "/smelt/v1/jobs/";
/// Prefix of live workers' keys (each attached to the worker's lease).
pub const WORKERS: &str = "/smelt/v1/workers/";
/// The election coordinators campaign in; the leader's value is its gRPC URL.
pub const ELECTION: &str = "/smelt/v1/leader";

pub fn job_spec(id: &str) -> String {
    format!("{JOBS}{id}/spec")
}
pub fn job_plan(id: &str) -> String {
    format!("{JOBS}{id}/plan")
}
pub fn job_state(id: &str) -> String {
    format!("{JOBS}{id}/state")
}
pub fn task_part(k: usize) -> String {
    format!("task/{k:06}")
}
pub fn job_task(id: &str, k: usize) -> String {
    format!("{JOBS}{id}/{}", task_part(k))
}
pub fn worker(id: &str) -> String {
    format!("{WORKERS}{id}")
}
