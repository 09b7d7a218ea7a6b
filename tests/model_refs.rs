//! Model references as mergekit takes them: Hugging Face ids resolved
//! offline from the local cache (with revisions), and `model+lora`.

mod common;

use std::path::Path;

use common::*;
use smelt_core::DType;
use smelt_core::io::writer::{ShardWriter, SlotSpec};
use smelt_core::synth::{LlamaSpec, write_llama};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn hugging_face_ids_resolve_from_the_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = LlamaSpec {
        dtype: DType::F32,
        ..LlamaSpec::tiny()
    };
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    write_llama(&a, &spec, 1, 1, 0.1).unwrap();
    write_llama(&b, &spec, 1, 2, 0.1).unwrap();
    // HF hub cache layout: models--org--name/{refs/<rev>, snapshots/<commit>/}
    let cache = tmp.path().join("hub");
    let repo = cache.join("models--acme--tiny");
    copy_dir(&a, &repo.join("snapshots/c0ffee"));
    copy_dir(&b, &repo.join("snapshots/beef01"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    write(&repo.join("refs/main"), "c0ffee\n");
    write(&repo.join("refs/v2"), "beef01");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cfg = work.join("c.yml");
    write(
        &cfg,
        "models:\n  - model: acme/tiny\n    parameters: {weight: 1}\n  - model: acme/tiny@v2\n    parameters: {weight: 3}\nmerge_method: linear\n",
    );
    let by_id = tmp.path().join("by-id");
    let o = smelt()
        .current_dir(&work)
        .env("HF_HUB_CACHE", &cache)
        .env_remove("HF_HOME")
        .args(["merge", "c.yml"])
        .arg(&by_id)
        .arg("--quiet")
        .output()
        .unwrap();
    assert_ok(&o);
    // the same merge from local paths gives the same tensors
    let local_cfg = tmp.path().join("local.yml");
    write(
        &local_cfg,
        &format!(
            "models:\n  - model: {}\n    parameters: {{weight: 1}}\n  - model: {}\n    parameters: {{weight: 3}}\nmerge_method: linear\n",
            a.display(),
            b.display()
        ),
    );
    let by_path = tmp.path().join("by-path");
    assert_ok(&merge(tmp.path(), &local_cfg, &by_path, &[]));
    assert_eq!(read_model(&by_id), read_model(&by_path));
    // --transformers-cache works too; an unknown revision is a clear error
    let o2 = smelt()
        .current_dir(&work)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME")
        .args(["check", "c.yml", "--transformers-cache"])
        .arg(&cache)
        .output()
        .unwrap();
    assert_eq!(
        o2.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o2.stdout)
    );
    write(
        &cfg,
        "models:\n  - model: acme/tiny@nope\n    parameters: {weight: 1}\nmerge_method: linear\n",
    );
    let o3 = smelt()
        .current_dir(&work)
        .env("HF_HUB_CACHE", &cache)
        .args(["merge", "c.yml"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert_eq!(o3.status.code(), Some(1));
    assert!(stderr(&o3).contains("acme/tiny@nope"), "{}", stderr(&o3));
}

#[test]
fn lora_adapters_are_applied_as_tensors_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = LlamaSpec {
        dtype: DType::F32,
        ..LlamaSpec::tiny()
    };
    let base = tmp.path().join("base");
    write_llama(&base, &spec, 3, 0, 0.0).unwrap();
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    write(
        &adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "fan_in_fan_out": false, "use_rslora": false, "bias": "none"}"#,
    );
    let (h, r) = (spec.hidden, 2usize);
    let a_vals: Vec<f32> = (0..r * h).map(|i| (i % 7) as f32 * 0.01).collect();
    let b_vals: Vec<f32> = (0..h * r).map(|i| (i % 5) as f32 * 0.02 - 0.03).collect();
    let key = "base_model.model.model.layers.0.self_attn.q_proj";
    let slots = vec![
        SlotSpec {
            name: format!("{key}.lora_A.weight"),
            dtype: DType::F32,
            shape: vec![r, h],
        },
        SlotSpec {
            name: format!("{key}.lora_B.weight"),
            dtype: DType::F32,
            shape: vec![h, r],
        },
    ];
    let w = ShardWriter::create(&adapter, &[("adapter_model.safetensors".into(), slots)]).unwrap();
    for (i, v) in [&a_vals, &b_vals].iter().enumerate() {
        let mut bytes = Vec::new();
        DType::F32.encode(v, &mut bytes);
        w.write(0, i, &bytes).unwrap();
    }
    w.finish().unwrap();
    let cfg = tmp.path().join("c.yml");
    write(
        &cfg,
        &format!(
            "models:\n  - model: {}+{}\n    parameters: {{weight: 1}}\nmerge_method: linear\n",
            base.display(),
            adapter.display()
        ),
    );
    let out = tmp.path().join("out");
    assert_ok(&merge(tmp.path(), &cfg, &out, &[]));
    let o = read_values(&out);
    let b0 = read_values(&base);
    let q = "model.layers.0.self_attn.q_proj.weight";
    let scale = 4.0 / 2.0;
    for row in 0..h {
        for col in 0..h {
            let delta: f32 = (0..r)
                .map(|k| b_vals[row * r + k] * a_vals[k * h + col])
                .sum::<f32>()
                * scale;
            let want = b0[q].data[row * h + col] + delta;
            let got = o[q].data[row * h + col];
            assert!((got - want).abs() <= 1e-5, "{row},{col}: {got} vs {want}");
        }
    }
    let k = "model.layers.0.self_attn.k_proj.weight";
    assert_eq!(o[k].data, b0[k].data, "untouched tensors are unchanged");
    assert_eq!(
        o["model.layers.1.self_attn.q_proj.weight"].data,
        b0["model.layers.1.self_attn.q_proj.weight"].data
    );
}
