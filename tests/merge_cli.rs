//! End-to-end behaviour of `smelt merge` on synthetic bf16 model families:
//! determinism, sharding, output safety, tied embeddings, gradients,
//! frankenmerges, Mixtral expert layouts.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use smelt_core::DType;
use smelt_core::synth::{LlamaSpec, write_family};

fn family(root: &Path, spec: &LlamaSpec, n: u64) -> Vec<PathBuf> {
    write_family(root, spec, 42, n, 0.01).expect("synthetic family")
}

fn spec_sharded() -> LlamaSpec {
    LlamaSpec {
        layers: 3,
        hidden: 64,
        intermediate: 128,
        vocab: 640,
        heads: 4,
        kv_heads: 2,
        dtype: DType::BF16,
        lm_head: true,
        shard_bytes: 40_000,
    }
}

/// A base + one fine-tune family and an equal-weight linear config over it.
fn linear_pair(spec: LlamaSpec) -> (tempfile::TempDir, Vec<PathBuf>, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ms = family(&tmp.path().join("fam"), &spec, 1);
    let cfg = tmp.path().join("lin.yml");
    write(
        &cfg,
        &yaml_models(
            "linear",
            &[(&ms[0], "{weight: 1}"), (&ms[1], "{weight: 1}")],
            None,
            "",
        ),
    );
    (tmp, ms, cfg)
}

fn yaml_models(method: &str, models: &[(&Path, &str)], base: Option<&Path>, extra: &str) -> String {
    let mut y = String::from("models:\n");
    for (m, p) in models {
        y += &format!("  - model: {}\n", m.display());
        if !p.is_empty() {
            y += &format!("    parameters: {p}\n");
        }
    }
    y += &format!("merge_method: {method}\n");
    if let Some(b) = base {
        y += &format!("base_model: {}\n", b.display());
    }
    y + extra
}

#[test]
fn random_methods_are_seeded_and_thread_count_independent() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = family(&tmp.path().join("fam"), &spec_sharded(), 2);
    for method in ["dare_ties", "della", "dare_linear"] {
        let params = "{weight: 0.6, density: 0.5}";
        let cfg = tmp.path().join(format!("{method}.yml"));
        write(
            &cfg,
            &yaml_models(
                method,
                &[(&ms[1], params), (&ms[2], params)],
                Some(&ms[0]),
                "",
            ),
        );
        let run = |name: &str, args: &[&str]| {
            let out = tmp.path().join(name);
            assert_ok(&merge(tmp.path(), &cfg, &out, args));
            dir_bytes(&out)
        };
        let one = run(
            &format!("{method}-t1"),
            &["--threads", "1", "--random-seed", "7"],
        );
        let two = run(
            &format!("{method}-t2"),
            &["--threads", "2", "--random-seed", "7"],
        );
        let other = run(
            &format!("{method}-seed8"),
            &["--threads", "2", "--random-seed", "8"],
        );
        for f in ["model.safetensors", "config.json", "mergekit_config.yml"] {
            assert!(
                one[f] == two[f],
                "{method}: same seed, 1 vs 2 threads must give identical {f}"
            );
        }
        assert!(
            one["model.safetensors"] != other["model.safetensors"],
            "{method}: a different seed must change the masks"
        );
        let card = String::from_utf8_lossy(&one["README.md"]).to_string();
        assert!(card.contains("Random seed: 7"), "{card}");
    }
}

#[test]
fn sharded_inputs_and_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = family(&tmp.path().join("fam"), &spec_sharded(), 2);
    assert!(
        ms[0].join("model.safetensors.index.json").exists(),
        "inputs are sharded"
    );
    let cfg = tmp.path().join("ties.yml");
    write(
        &cfg,
        &yaml_models(
            "ties",
            &[
                (&ms[1], "{weight: 1.0, density: 0.5}"),
                (&ms[2], "{weight: 0.5, density: 0.7}"),
            ],
            Some(&ms[0]),
            "",
        ),
    );
    let whole = tmp.path().join("whole");
    let sharded = tmp.path().join("sharded");
    assert_ok(&merge(tmp.path(), &cfg, &whole, &[]));
    assert_ok(&merge(
        tmp.path(),
        &cfg,
        &sharded,
        &["--out-shard-size", "30K"],
    ));
    assert!(whole.join("model.safetensors").exists());
    assert!(
        !whole.join("model.safetensors.index.json").exists(),
        "one shard: no index"
    );
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let wm = index["weight_map"].as_object().unwrap();
    let files: std::collections::BTreeSet<&str> =
        wm.values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 2, "{files:?}");
    let n = files.len();
    for (k, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{:05}.safetensors", k + 1, n));
    }
    // write order: ascending input name (lm_head first, layers.0 before layers.1)
    let order: Vec<&String> = wm.keys().collect();
    assert_eq!(order[0], "lm_head.weight");
    // what mergekit 0.1.5 writes there (its own sharded output, generated
    // with `--out-shard-size 200K`: `"mergekit_version": "0.1.5"`)
    assert_eq!(index["metadata"]["mergekit_version"], "0.1.5");
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap() as usize,
        read_model(&whole)
            .values()
            .map(|t| t.2.len())
            .sum::<usize>()
    );
    assert_eq!(
        read_model(&whole),
        read_model(&sharded),
        "sharding must not change tensors"
    );
}

#[test]
fn linear_bf16_matches_hand_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = family(&tmp.path().join("fam"), &spec_sharded(), 2);
    let cfg = tmp.path().join("lin.yml");
    write(
        &cfg,
        &yaml_models(
            "linear",
            &[(&ms[1], "{weight: 0.6}"), (&ms[2], "{weight: 0.4}")],
            None,
            "",
        ),
    );
    let out = tmp.path().join("out");
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    let a = read_values(&ms[1]);
    let b = read_values(&ms[2]);
    let o = read_values(&out);
    // mergekit 0.1.5: f32 coefficients and accumulator, one rounding
    let r = |x: f32| DType::BF16.round(x);
    let (w0, w1) = (0.6f32, 0.4f32);
    let ws = w0 + w1;
    for (name, t) in &o {
        assert_eq!(t.dtype, DType::BF16);
        for i in 0..t.numel() {
            let expect = r((0.0 + w0 * a[name].data[i] + w1 * b[name].data[i]) / ws);
            assert_eq!(t.data[i], expect, "{name}[{i}]");
        }
    }
}

#[test]
fn gradients_interpolate_across_layers_and_out_dtype_applies() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = spec_sharded();
    spec.dtype = DType::F32;
    spec.layers = 3;
    let ms = family(&tmp.path().join("fam"), &spec, 2);
    let cfg = tmp.path().join("grad.yml");
    // weight of ft1 goes 1 → 0 over layers, ft2 the reverse; normalised linear
    write(
        &cfg,
        &yaml_models(
            "linear",
            &[(&ms[1], "{weight: [1, 0]}"), (&ms[2], "{weight: [0, 1]}")],
            None,
            "out_dtype: bfloat16\n",
        ),
    );
    let out = tmp.path().join("out");
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    let a = read_values(&ms[1]);
    let b = read_values(&ms[2]);
    let o = read_values(&out);
    let q = "model.layers.0.self_attn.q_proj.weight";
    let q2 = "model.layers.2.self_attn.q_proj.weight";
    let q1 = "model.layers.1.self_attn.q_proj.weight";
    assert_eq!(o[q].dtype, DType::BF16);
    for i in 0..o[q].numel() {
        assert_eq!(
            o[q].data[i],
            DType::BF16.round(a[q].data[i]),
            "layer 0 is ft1"
        );
        assert_eq!(
            o[q2].data[i],
            DType::BF16.round(b[q2].data[i]),
            "last layer is ft2"
        );
        let mid = DType::BF16.round(0.5 * a[q1].data[i] + 0.5 * b[q1].data[i]);
        assert!(
            (o[q1].data[i] - mid).abs() <= 1e-2 * mid.abs().max(1e-3),
            "middle layer is the average"
        );
    }
    // pre/post weights take the first gradient value (t = 0): ft1
    assert_eq!(
        o["lm_head.weight"].data[5],
        DType::BF16.round(a["lm_head.weight"].data[5])
    );
    let cfgj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfgj["dtype"], "bfloat16");
}

#[test]
fn filters_pick_values_per_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = spec_sharded();
    spec.dtype = DType::F32;
    let ms = family(&tmp.path().join("fam"), &spec, 1);
    let cfg = tmp.path().join("slerp.yml");
    write(
        &cfg,
        &format!(
            "models:\n  - model: {b}\n  - model: {f}\nmerge_method: slerp\nbase_model: {b}\nparameters:\n  t:\n    - filter: self_attn\n      value: 0\n    - filter: mlp\n      value: 1\n    - value: 0\n",
            b = ms[0].display(),
            f = ms[1].display()
        ),
    );
    let out = tmp.path().join("out");
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    let base = read_values(&ms[0]);
    let ft = read_values(&ms[1]);
    let o = read_values(&out);
    let attn = "model.layers.1.self_attn.k_proj.weight";
    let mlp = "model.layers.1.mlp.up_proj.weight";
    assert_eq!(o[attn].data, base[attn].data, "t=0 on attention: base");
    for (x, y) in o[mlp].data.iter().zip(&ft[mlp].data) {
        assert!((x - y).abs() <= 1e-6, "t=1 on mlp: the fine-tune");
    }
}

#[test]
fn tied_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tied = spec_sharded();
    tied.lm_head = false;
    let ms = family(&tmp.path().join("tied"), &tied, 1);
    let cfg = tmp.path().join("tied.yml");
    write(
        &cfg,
        &yaml_models(
            "linear",
            &[(&ms[0], "{weight: 0.5}"), (&ms[1], "{weight: 0.5}")],
            None,
            "",
        ),
    );
    let out = tmp.path().join("out");
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    assert!(
        !read_model(&out).contains_key("lm_head.weight"),
        "no input has lm_head: output stays tied"
    );
    // one untied model: the tied one contributes its embeddings as lm_head
    let untied = family(&tmp.path().join("untied"), &spec_sharded(), 0);
    let cfg2 = tmp.path().join("mixed.yml");
    write(
        &cfg2,
        &yaml_models(
            "linear",
            &[(&ms[0], "{weight: 1.0}"), (&untied[0], "{weight: 1.0}")],
            None,
            "",
        ),
    );
    let out2 = tmp.path().join("out2");
    assert_ok(&merge(tmp.path(), &cfg2, &out2, &[]));
    let o = read_values(&out2);
    let t = read_values(&ms[0]);
    let u = read_values(&untied[0]);
    let r = |x: f32| DType::BF16.round(x);
    let i = 17;
    let expect = r(r(t["model.embed_tokens.weight"].data[i] + u["lm_head.weight"].data[i]) / 2.0);
    assert_eq!(o["lm_head.weight"].data[i], expect);
}

#[test]
fn frankenmerge_renumbers_layers_and_updates_config() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = spec_sharded();
    spec.layers = 4;
    let ms = family(&tmp.path().join("fam"), &spec, 1);
    let cfg = tmp.path().join("franken.yml");
    write(
        &cfg,
        &format!(
            "slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n  - sources:\n      - model: {b}\n        layer_range: [1, 4]\nmerge_method: passthrough\n",
            a = ms[0].display(),
            b = ms[1].display()
        ),
    );
    let out = tmp.path().join("out");
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    let cfgj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfgj["num_hidden_layers"], 6);
    let o = read_model(&out);
    let a = read_model(&ms[0]);
    let b = read_model(&ms[1]);
    assert_eq!(
        o["model.layers.2.mlp.up_proj.weight"],
        a["model.layers.2.mlp.up_proj.weight"]
    );
    assert_eq!(
        o["model.layers.3.mlp.up_proj.weight"],
        b["model.layers.1.mlp.up_proj.weight"]
    );
    assert_eq!(
        o["model.layers.5.mlp.up_proj.weight"],
        b["model.layers.3.mlp.up_proj.weight"]
    );
    assert!(!o.contains_key("model.layers.6.mlp.up_proj.weight"));
    // out-of-range layer ranges are refused before any work, naming the field
    let bad = tmp.path().join("bad.yml");
    write(
        &bad,
        &std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("[1, 4]", "[1, 5]")
            .replace("[0, 3]", "[0, 4]"),
    );
    let o = merge(tmp.path(), &bad, &tmp.path().join("bad-out"), &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("slices[1].sources[0].layer_range"),
        "{}",
        stderr(&o)
    );
    assert!(!tmp.path().join("bad-out").exists());
}

#[test]
fn output_safety() {
    let (tmp, ms, cfg) = linear_pair(LlamaSpec::tiny());
    // an existing file at OUT is never touched
    let file = tmp.path().join("afile");
    write(&file, "precious");
    let o = merge(tmp.path(), &cfg, &file, &[]);
    assert!(!o.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    // a non-empty directory is refused without --overwrite, replaced with it
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    write(&out.join("old.txt"), "old");
    let o = merge(tmp.path(), &cfg, &out, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert!(out.join("old.txt").exists());
    assert_ok(&merge(tmp.path(), &cfg, &out, &["--overwrite"]));
    assert!(!out.join("old.txt").exists());
    assert!(out.join("model.safetensors").exists());
    // a failing merge (missing required parameter) leaves nothing behind
    let bad = tmp.path().join("bad.yml");
    write(
        &bad,
        &yaml_models("linear", &[(&ms[0], "{weight: 1}"), (&ms[1], "")], None, ""),
    );
    let o = merge(tmp.path(), &bad, &tmp.path().join("never"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("weight"), "{}", stderr(&o));
    assert!(!tmp.path().join("never").exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("smelt-tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary directories left: {leftovers:?}"
    );
    // a stale temporary from a killed run (dead pid) is cleaned by the next run
    let stale = tmp.path().join(".out2.smelt-tmp-4000000");
    std::fs::create_dir(&stale).unwrap();
    write(&stale.join("model.safetensors"), "partial");
    assert_ok(&merge(tmp.path(), &cfg, &tmp.path().join("out2"), &[]));
    assert!(!stale.exists());
}

#[test]
fn mergekit_options_are_accepted() {
    let (tmp, _, cfg) = linear_pair(LlamaSpec::tiny());
    let out = tmp.path().join("out");
    let o = merge(
        tmp.path(),
        &cfg,
        &out,
        &[
            "--cuda",
            "--low-cpu-memory",
            "--lazy-unpickle",
            "--no-copy-tokenizer",
            "--allow-crimes",
            "-j",
            "2",
            "--out-shard-size",
            "5B",
            "--async-write",
            "--write-threads",
            "2",
            "--device",
            "cpu",
            "-v",
            "--no-write-model-card",
            "--trust-remote-code",
            "--clone-tensors",
            "--unsafe-truncate-embeddings",
        ],
    );
    assert_ok(&o);
    assert!(stderr(&o).contains("note: --cuda"), "{}", stderr(&o));
    assert!(!out.join("tokenizer.json").exists(), "--no-copy-tokenizer");
    assert!(!out.join("README.md").exists(), "--no-write-model-card");
    assert!(out.join("config.json").exists());
}

#[test]
fn mixtral_per_expert_checkpoints_are_fused() {
    use smelt_core::io::writer::{ShardWriter, SlotSpec};
    let tmp = tempfile::tempdir().unwrap();
    let (h, i, e) = (8usize, 12usize, 2usize);
    let mk = |dir: &Path, seed: f32| {
        std::fs::create_dir_all(dir).unwrap();
        let mut slots = vec![
            ("model.embed_tokens.weight".to_string(), vec![16, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        let p = "model.layers.0";
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            slots.push((format!("{p}.{n}"), vec![h]));
        }
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            slots.push((format!("{p}.self_attn.{n}.weight"), vec![h, h]));
        }
        slots.push((format!("{p}.block_sparse_moe.gate.weight"), vec![e, h]));
        for x in 0..e {
            slots.push((
                format!("{p}.block_sparse_moe.experts.{x}.w1.weight"),
                vec![i, h],
            ));
            slots.push((
                format!("{p}.block_sparse_moe.experts.{x}.w3.weight"),
                vec![i, h],
            ));
            slots.push((
                format!("{p}.block_sparse_moe.experts.{x}.w2.weight"),
                vec![h, i],
            ));
        }
        let specs: Vec<SlotSpec> = slots
            .iter()
            .map(|(n, s)| SlotSpec {
                name: n.clone(),
                dtype: DType::F32,
                shape: s.clone(),
            })
            .collect();
        let w = ShardWriter::create(dir, &[("model.safetensors".into(), specs.clone())]).unwrap();
        for (k, s) in specs.iter().enumerate() {
            let n: usize = s.shape.iter().product();
            let vals: Vec<f32> = (0..n)
                .map(|j| seed + k as f32 * 1000.0 + j as f32)
                .collect();
            let mut b = Vec::new();
            DType::F32.encode(&vals, &mut b);
            w.write(0, k, &b).unwrap();
        }
        w.finish().unwrap();
        write(&dir.join("config.json"), &serde_json::json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 1, "num_local_experts": e, "hidden_size": h, "vocab_size": 16}).to_string());
    };
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    mk(&a, 0.0);
    mk(&b, 2.0);
    let cfg = tmp.path().join("moe.yml");
    write(
        &cfg,
        &yaml_models(
            "linear",
            &[(&a, "{weight: 1}"), (&b, "{weight: 1}")],
            None,
            "",
        ),
    );
    let out = tmp.path().join("out");
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    let o = read_values(&out);
    let gu = &o["model.layers.0.mlp.experts.gate_up_proj"];
    assert_eq!(gu.shape, vec![e, 2 * i, h]);
    let dn = &o["model.layers.0.mlp.experts.down_proj"];
    assert_eq!(dn.shape, vec![e, h, i]);
    assert_eq!(o["model.layers.0.mlp.gate.weight"].shape, vec![e, h]);
    // expert 1's up rows come from w3 of expert 1: mean of a and b (+1.0 offset)
    let ra = read_values(&a);
    let up1 = &ra["model.layers.0.block_sparse_moe.experts.1.w3.weight"];
    let at = 2 * i * h + i * h + 3; // expert 1 block (2·i·h), after its gate rows (i·h), element 3
    assert_eq!(gu.data[at], up1.data[3] + 1.0);
}

#[test]
fn killed_merge_leaves_nothing_finished_and_a_rerun_cleans_up() {
    let (tmp, _, cfg) = linear_pair(spec_sharded());
    let out = tmp.path().join("out");
    // the chaos switch stalls the merge after 5 tensors; then kill -9
    let mut child = smelt()
        .current_dir(tmp.path())
        .env("SMELT_CHAOS_STALL_AFTER", "5")
        .args(["merge", "lin.yml", "out", "--quiet", "--threads", "1"])
        .spawn()
        .unwrap();
    let tmp_dir = tmp.path().join(format!(".out.smelt-tmp-{}", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !tmp_dir.join("model.safetensors").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "merge never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.exists(),
        "a killed merge must not leave a finished-looking output"
    );
    assert!(
        tmp_dir.exists(),
        "the partial output stays in the temporary directory"
    );
    // a rerun succeeds and removes the stale temporary
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    assert!(!tmp_dir.exists(), "stale temporary cleaned up");
    assert!(out.join("model.safetensors").exists() && out.join("config.json").exists());
}

#[test]
fn vocabulary_size_differences_warn_and_truncate() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    smelt_core::synth::write_llama(
        &a,
        &LlamaSpec {
            vocab: 64,
            ..LlamaSpec::tiny()
        },
        1,
        1,
        0.1,
    )
    .unwrap();
    smelt_core::synth::write_llama(
        &b,
        &LlamaSpec {
            vocab: 72,
            ..LlamaSpec::tiny()
        },
        1,
        2,
        0.1,
    )
    .unwrap();
    let cfg = tmp.path().join("c.yml");
    write(
        &cfg,
        &yaml_models(
            "linear",
            &[(&a, "{weight: 1}"), (&b, "{weight: 1}")],
            None,
            "",
        ),
    );
    let o = merge(tmp.path(), &cfg, &tmp.path().join("out"), &[]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("embedding sizes differ"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        read_values(&tmp.path().join("out"))["model.embed_tokens.weight"].shape,
        vec![64, 32]
    );
    // --strict refuses the same merge
    let o = merge(tmp.path(), &cfg, &tmp.path().join("out2"), &["--strict"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn row_blocks_under_a_small_memory_cap_give_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = family(&tmp.path().join("fam"), &spec_sharded(), 2);
    let w = "{weight: 0.7}";
    let cases = [
        (
            "linear",
            yaml_models(
                "linear",
                &[(&ms[1], w), (&ms[2], "{weight: 0.3}")],
                None,
                "",
            ),
        ),
        (
            "ta",
            yaml_models(
                "task_arithmetic",
                &[(&ms[1], w), (&ms[2], w)],
                Some(&ms[0]),
                "parameters: {lambda: 0.9}\n",
            ),
        ),
        (
            "ties_dense",
            yaml_models("ties", &[(&ms[1], w), (&ms[2], w)], Some(&ms[0]), ""),
        ),
        (
            "nuslerp_rows",
            yaml_models(
                "nuslerp",
                &[(&ms[1], w), (&ms[2], "{weight: 0.4}")],
                Some(&ms[0]),
                "parameters: {nuslerp_flatten: false}\n",
            ),
        ),
        (
            "nearswap",
            yaml_models(
                "nearswap",
                &[(&ms[1], "")],
                Some(&ms[0]),
                "parameters: {t: 0.001}\n",
            ),
        ),
        (
            "ram",
            yaml_models("ram", &[(&ms[1], ""), (&ms[2], "")], Some(&ms[0]), ""),
        ),
    ];
    for (name, yaml) in cases {
        let cfg = tmp.path().join(format!("{name}.yml"));
        write(&cfg, &yaml);
        let whole = tmp.path().join(format!("{name}-whole"));
        let blocks = tmp.path().join(format!("{name}-blocks"));
        assert_ok(&merge(tmp.path(), &cfg, &whole, &[]));
        // 64 KB: every large tensor (embeddings, MLP) is merged in row blocks
        assert_ok(&merge(tmp.path(), &cfg, &blocks, &["--max-memory", "64K"]));
        assert!(
            std::fs::read(whole.join("model.safetensors")).unwrap()
                == std::fs::read(blocks.join("model.safetensors")).unwrap(),
            "{name}: row blocks changed the output"
        );
    }
}

#[test]
fn unknown_architectures_are_inferred_from_tensor_names() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = family(&tmp.path().join("fam"), &LlamaSpec::tiny(), 1);
    for m in &ms {
        let p = m.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c["architectures"] = serde_json::json!(["NovelForCausalLM"]);
        c["model_type"] = serde_json::json!("novel");
        std::fs::write(&p, c.to_string()).unwrap();
    }
    let cfg = tmp.path().join("c.yml");
    write(
        &cfg,
        &yaml_models(
            "linear",
            &[(&ms[0], "{weight: 1}"), (&ms[1], "{weight: 1}")],
            None,
            "",
        ),
    );
    let out = tmp.path().join("out");
    let o = merge(tmp.path(), &cfg, &out, &[]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("no architecture definition"),
        "{}",
        stderr(&o)
    );
    let a = read_model(&ms[0]);
    let got = read_model(&out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        a.keys().collect::<Vec<_>>(),
        "every tensor is merged"
    );
}

/// The vectorised kernels (AVX2 / AVX-512, picked at run time) give the same
/// bytes as the baseline ones (`SMELT_NO_SIMD=1`), and 1 thread the same as
/// 2, on tensors large enough to be merged streamed.
#[test]
fn simd_kernels_give_the_same_bytes_as_baseline_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = LlamaSpec {
        layers: 1,
        hidden: 256,
        intermediate: 1024,
        vocab: 1024,
        heads: 4,
        kv_heads: 2,
        dtype: DType::BF16,
        lm_head: true,
        shard_bytes: 0,
    };
    let ms = family(&tmp.path().join("fam"), &spec, 2);
    for method in [
        "ties",
        "dare_ties",
        "della",
        "task_arithmetic",
        "slerp",
        "linear",
    ] {
        let (models, extra) = if method == "slerp" {
            (
                vec![(ms[0].as_path(), "{}"), (ms[1].as_path(), "{}")],
                "parameters: {t: 0.3}\n",
            )
        } else if method == "linear" {
            (
                vec![
                    (ms[1].as_path(), "{weight: 0.6}"),
                    (ms[2].as_path(), "{weight: 0.3}"),
                ],
                "",
            )
        } else {
            let p = "{weight: 0.6, density: 0.5}";
            (vec![(ms[1].as_path(), p), (ms[2].as_path(), p)], "")
        };
        let base = (method != "linear").then_some(ms[0].as_path());
        let cfg = tmp.path().join(format!("{method}.yml"));
        write(&cfg, &yaml_models(method, &models, base, extra));
        let run = |name: &str, no_simd: bool, threads: &str| {
            let out = tmp.path().join(name);
            let mut c = smelt();
            c.current_dir(tmp.path())
                .arg("merge")
                .arg(&cfg)
                .arg(&out)
                .args(["--quiet", "--random-seed", "3", "--threads", threads]);
            if no_simd {
                c.env("SMELT_NO_SIMD", "1");
            }
            assert_ok(&c.output().unwrap());
            dir_bytes(&out)
        };
        let (on, off, one) = (
            run(&format!("{method}-simd"), false, "2"),
            run(&format!("{method}-base"), true, "2"),
            run(&format!("{method}-t1"), false, "1"),
        );
        assert!(
            on["model.safetensors"] == off["model.safetensors"],
            "{method}: vectorised and baseline kernels differ"
        );
        // TIES counts its boundary keys in block order across workers
        assert!(
            on["model.safetensors"] == one["model.safetensors"],
            "{method}: 1 and 2 threads differ"
        );
    }
}

/// `smelt bench` on a one-layer family of hidden size 64 in `dir`.
fn tiny_bench(dir: &Path) -> std::process::Command {
    let mut c = smelt();
    c.args(["bench", "--dir"]).arg(dir).args([
        "--layers",
        "1",
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--vocab",
        "256",
    ]);
    c
}

/// `smelt bench` end to end on a tiny family: generates it, measures the
/// floor, runs each method `--repeat` times and prints a row per method.
#[test]
fn bench_runs_end_to_end_with_repeats() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fam");
    let o = tiny_bench(&dir)
        .args(["--methods", "linear,ties", "--repeat", "2"])
        .output()
        .unwrap();
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("best of 2 run(s)"), "{out}");
    assert!(out.contains("I/O floor"), "{out}");
    for m in ["linear", "ties"] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(m)),
            "no row for {m}:\n{out}"
        );
    }
    // Each method ran twice.
    let runs = stderr(&o).matches("running smelt merge (ties)").count();
    assert_eq!(runs, 2, "{}", stderr(&o));
    // the peak RSS column is the child's own: a few MB for a tiny merge
    let linear = out
        .lines()
        .find(|l| l.trim_start().starts_with("linear"))
        .unwrap();
    let rss: f64 = linear.split_whitespace().nth(5).unwrap().parse().unwrap();
    assert!(rss > 0.5 && rss < 200.0, "peak RSS {rss} MB:\n{out}");
}

/// `smelt bench --compare mergekit` against stand-ins for `mergekit-yaml`
/// on PATH: smelt itself (identical outputs, whatever the method) and one
/// that hands back the base model (every element differs where the merge
/// changed it, none changed from the base). Every smelt merge runs before
/// the first mergekit one.
#[test]
fn bench_compares_outputs_with_mergekit() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fam");
    let run = |script: &str| {
        let bin = tmp.path().join(format!("bin-{}", script.len()));
        std::fs::create_dir_all(&bin).unwrap();
        let mk = bin.join("mergekit-yaml");
        std::fs::write(&mk, script).unwrap();
        std::fs::set_permissions(&mk, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let o = tiny_bench(&dir)
            .env("PATH", path)
            .args(["--methods", "linear,della", "--repeat", "1"])
            .args(["--compare", "mergekit"])
            .output()
            .unwrap();
        assert_ok(&o);
        let err = stderr(&o);
        let last_smelt = err.rfind("running smelt merge").unwrap();
        let first_mk = err.find("running mergekit-yaml").unwrap();
        assert!(last_smelt < first_mk, "{err}");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let row = |m: &str| -> Vec<String> {
            let after = out
                .split("agreement with mergekit")
                .nth(1)
                .unwrap_or_else(|| panic!("{out}"));
            after
                .lines()
                .find(|l| l.starts_with(m))
                .unwrap_or_else(|| panic!("no agreement row for {m}:\n{out}"))
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        (row("linear"), row("della"))
    };
    let smelt_bin = env!("CARGO_BIN_EXE_smelt");
    // fields: method, max rel, differ %, "%", changed smelt %, "%", "/", changed mk %, "%", ...
    let (lin, della) = run(&format!(
        "#!/bin/sh\nexec '{smelt_bin}' merge \"$1\" \"$2\" --quiet\n"
    ));
    for r in [&lin, &della] {
        assert_eq!(
            (r[1].as_str(), r[2].as_str()),
            ("0.000e0", "0.000"),
            "{r:?}"
        );
        assert_eq!(r[4], r[7], "{r:?}");
    }
    let base = dir.join("base");
    let (lin, _) = run(&format!(
        "#!/bin/sh\nmkdir -p \"$2\" && cp -r '{}'/. \"$2\"\n",
        base.display()
    ));
    let differ: f64 = lin[2].parse().unwrap();
    let changed: f64 = lin[4].parse().unwrap();
    assert!(differ > 50.0 && differ == changed, "{lin:?}");
    assert_eq!(lin[7], "0.000", "{lin:?}");
}

/// A `smelt` process asked for its peak RSS (as `smelt bench` asks its
/// children) writes its `VmHWM` in kB to the named file as it exits.
#[test]
fn smelt_reports_its_peak_rss_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("rss");
    let o = smelt()
        .current_dir(repo())
        .args(["merge", "examples/ties.yml"])
        .arg(tmp.path().join("out"))
        .arg("--quiet")
        .env("SMELT_PEAK_RSS_FILE", &report)
        .output()
        .unwrap();
    assert_ok(&o);
    let kb: u64 = std::fs::read_to_string(&report)
        .expect("report written")
        .trim()
        .parse()
        .expect("a number of kB");
    assert!(kb > 100 && kb < 1_000_000, "VmHWM {kb} kB");
}

/// The donor's tokenizer files as mergekit 0.1.5 copies them: with
/// tokenizer_config.json and tokenizer.json it copies its list (no
/// vocab.json; generation_config.json included); with a chat template it
/// re-saves the tokenizer through transformers (no generation_config.json).
#[test]
fn tokenizer_files_are_copied_as_mergekit_copies_them() {
    let (tmp, ms, cfg) = linear_pair(LlamaSpec::tiny());
    let donor = &ms[0];
    for (f, text) in [
        ("tokenizer_config.json", "{\"model_max_length\": 128}"),
        ("tokenizer.json", "{\"model\": {\"vocab\": {}}}"),
        ("vocab.json", "{}"),
        ("generation_config.json", "{\"bos_token_id\": 1}"),
    ] {
        write(&donor.join(f), text);
    }
    let out = tmp.path().join("out");
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    assert!(out.join("tokenizer.json").exists());
    assert!(out.join("generation_config.json").exists());
    assert!(
        !out.join("vocab.json").exists(),
        "mergekit does not copy vocab.json"
    );
    let text = std::fs::read_to_string(&cfg).unwrap() + "chat_template: chatml\n";
    let cfg2 = tmp.path().join("chat.yml");
    write(&cfg2, &text);
    let out2 = tmp.path().join("out2");
    assert_ok(&merge(tmp.path(), &cfg2, &out2, &[]));
    assert!(out2.join("tokenizer.json").exists());
    assert!(!out2.join("generation_config.json").exists());
    assert!(!out2.join("vocab.json").exists());
}
