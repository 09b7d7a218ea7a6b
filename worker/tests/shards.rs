//! The worker runs work items (one output shard each) through the same
//! executor as `smelt merge`: running every item, in any order, gives the
//! same bytes as the local merge.

use smelt_core::io::{ModelTensors, ShardWriter};
use smelt_core::synth::{LlamaSpec, write_family};

#[test]
fn shards_run_separately_match_a_local_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = write_family(&tmp.path().join("fam"), &LlamaSpec::tiny(), 5, 2, 0.02).unwrap();
    let cfg = tmp.path().join("c.yml");
    std::fs::write(
        &cfg,
        format!(
            "models:\n  - model: {}\n    parameters: {{weight: 1, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.7}}\nmerge_method: dare_ties\nbase_model: {}\n",
            ms[1].display(),
            ms[2].display(),
            ms[0].display()
        ),
    )
    .unwrap();
    let mut opts = smelt_core::MergeOptions::default();
    opts.plan.out_shard_size = 20_000;
    opts.plan.random_seed = 11;
    let local = tmp.path().join("local");
    let plan = smelt_core::merge(&cfg, &local, &opts, &|_, _, _| {}).unwrap();
    assert!(plan.shards.len() > 2, "{} shards", plan.shards.len());

    // coordinator side: split; worker side: run items in reverse order
    let items = smelt_coordinator::split_plan(&plan);
    assert_eq!(items.len(), plan.shards.len());
    assert_eq!(
        items.iter().map(|i| i.bytes).sum::<u64>(),
        plan.total_bytes()
    );
    let dist = tmp.path().join("dist");
    std::fs::create_dir(&dist).unwrap();
    let models: Vec<ModelTensors> = plan
        .models
        .iter()
        .map(|m| {
            ModelTensors::open_dir(std::path::Path::new(&m.location), &m.reference.to_string())
                .unwrap()
        })
        .collect();
    let writer = ShardWriter::create(&dist, &plan.shard_slots()).unwrap();
    for item in items.iter().rev() {
        smelt_worker::run_shards(&plan, &[item.shard], &models, &writer, 1 << 20).unwrap();
    }
    writer.finish().unwrap();
    for s in &plan.shards {
        let a = std::fs::read(local.join(&s.file_name)).unwrap();
        let b = std::fs::read(dist.join(&s.file_name)).unwrap();
        assert!(a == b, "shard {} differs", s.file_name);
    }
}
