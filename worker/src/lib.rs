//! The worker side: runs the tensors of given shards of a plan through the
//! same executor `smelt merge` uses. Task fetching over gRPC and object-store
//! outputs arrive with the cluster issue.

use smelt_core::Result;
use smelt_core::executor;
use smelt_core::io::{ModelTensors, ShardWriter};
use smelt_core::plan::MergePlan;

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
