//! The coordinator: plans a merge (the same planner as `smelt merge`),
//! splits it into tasks (one per output shard file), hands tasks to workers
//! over gRPC, and keeps job state and leadership in etcd so that another
//! coordinator resumes a job without redoing finished tasks.
//!
//! - [`registry`]: the job table and its transitions (pure, unit-tested).
//! - [`service`]: the gRPC services and the leadership loop.
//! - [`etcd`]: leases, fenced writes, election helpers (also used by workers).
//! - [`output`]: the output location (shards by workers, index last).

pub mod etcd;
pub mod keys;
pub mod output;
pub mod registry;
pub mod service;

pub use service::{CoordinatorConfig, Node};

use smelt_core::plan::MergePlan;

/// One unit of work: the tensors of one output shard.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkItem {
    pub shard: usize,
    pub file_name: String,
    /// Indices into the plan's tensor list.
    pub tensors: Vec<usize>,
    pub bytes: u64,
}

/// Splits a plan into per-shard work items, in shard order.
pub fn split_plan(plan: &MergePlan) -> Vec<WorkItem> {
    plan.shards
        .iter()
        .enumerate()
        .map(|(k, s)| WorkItem {
            shard: k,
            file_name: s.file_name.clone(),
            tensors: s.tensors.clone(),
            bytes: s.tensors.iter().map(|i| plan.tensors[*i].out_bytes()).sum(),
        })
        .collect()
}
