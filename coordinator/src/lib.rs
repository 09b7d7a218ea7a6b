//! The coordinator's planning side: a merge plan is split into work items,
//! one per output shard file, each carrying everything a worker needs.
//! Transport (gRPC), membership and leases (etcd) arrive with the cluster
//! issue; this crate stays free of the worker crate.

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
