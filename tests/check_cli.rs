//! `smelt check`: every problem at once, from headers only, as text or JSON.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use serde_json::Value;
use smelt_core::DType;
use smelt_core::synth::{LlamaSpec, write_family, write_llama_sparse};

fn check(cwd: &Path, config: &Path, args: &[&str]) -> Output {
    smelt()
        .current_dir(cwd)
        .arg("check")
        .arg(config)
        .args(args)
        .output()
        .expect("smelt runs")
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn ok_config_prints_the_plan() {
    let case = repo().join("tests/conformance/cases/ties_basic");
    let o = check(&case, Path::new("config.yml"), &["--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = json(&o);
    assert_eq!(r["ok"], true);
    assert_eq!(r["problems"].as_array().unwrap().len(), 0);
    assert_eq!(r["plan"]["method"], "ties");
    assert_eq!(r["plan"]["output_tensors"], 39);
    assert_eq!(r["plan"]["shards"], 1);
    assert!(r["plan"]["output_bytes"].as_u64().unwrap() > 700_000);
    assert!(r["plan"]["free_disk_bytes"].as_u64().unwrap() > 0);
    assert!(r["plan"]["estimated_peak_memory_bytes"].as_u64().unwrap() > 0);
    let o = check(&case, Path::new("config.yml"), &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("plan: ties llama merge of 4 model(s)") && text.contains("39 tensors"),
        "{text}"
    );
}

#[test]
fn reports_every_problem_at_once_with_locations() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = write_family(&tmp.path().join("fam"), &LlamaSpec::tiny(), 1, 1, 0.01).unwrap();
    let cfg = tmp.path().join("c.yml");
    write(
        &cfg,
        &format!(
            "models:\n  - model: {a}\n    parameters:\n      weight: 1\n      densty: 0.5\n  - model: {t}/missing_one\n  - model: {t}/missing_two\nmerge_method: linear\nfancy: true\n",
            a = ms[1].display(),
            t = tmp.path().display()
        ),
    );
    let o = check(tmp.path(), &cfg, &["--json"]);
    assert_eq!(o.status.code(), Some(1));
    let r = json(&o);
    assert_eq!(r["ok"], false);
    let ps = r["problems"].as_array().unwrap();
    let codes: Vec<&str> = ps.iter().map(|p| p["code"].as_str().unwrap()).collect();
    assert_eq!(
        codes.iter().filter(|c| **c == "model_not_found").count(),
        2,
        "{codes:?}"
    );
    let unknown = ps
        .iter()
        .find(|p| p["code"] == "unknown_key")
        .expect("unknown key warning");
    assert_eq!(unknown["severity"], "warning");
    assert_eq!(unknown["field"], "fancy");
    assert_eq!(
        (unknown["line"].as_u64(), unknown["column"].as_u64()),
        (Some(9), Some(1))
    );
    let ignored = ps
        .iter()
        .find(|p| p["code"] == "ignored_parameter")
        .expect("ignored parameter warning");
    assert_eq!(ignored["field"], "models[0].parameters.densty");
    assert_eq!(ignored["line"], 5);
    for p in ps {
        for k in [
            "severity", "code", "message", "model", "file", "tensor", "field", "line", "column",
        ] {
            assert!(p.get(k).is_some(), "problem lacks {k}: {p}");
        }
    }
    let missing = ps.iter().find(|p| p["code"] == "model_not_found").unwrap();
    assert!(missing["model"].as_str().unwrap().contains("missing_"));
}

#[test]
fn missing_tensors_are_all_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = write_family(
        &tmp.path().join("fam"),
        &LlamaSpec {
            dtype: DType::F32,
            ..LlamaSpec::tiny()
        },
        1,
        1,
        0.01,
    )
    .unwrap();
    // drop two tensors from ft1 by rewriting it without them
    let src = smelt_core::io::ModelTensors::open_dir(&ms[1], "ft1").unwrap();
    let keep: Vec<String> = src
        .tensors
        .keys()
        .filter(|n| {
            !n.ends_with("layers.0.mlp.up_proj.weight")
                && !n.ends_with("layers.1.self_attn.q_proj.weight")
        })
        .cloned()
        .collect();
    let slots: Vec<smelt_core::io::writer::SlotSpec> = keep
        .iter()
        .map(|n| smelt_core::io::writer::SlotSpec {
            name: n.clone(),
            dtype: src.tensors[n].dtype,
            shape: src.tensors[n].shape.clone(),
        })
        .collect();
    let bytes: Vec<Vec<u8>> = keep.iter().map(|n| src.read_raw(n).unwrap().1).collect();
    drop(src);
    let w = smelt_core::io::ShardWriter::create(&ms[1], &[("model.safetensors".into(), slots)])
        .unwrap();
    for (i, b) in bytes.iter().enumerate() {
        w.write(0, i, b).unwrap();
    }
    w.finish().unwrap();
    let cfg = tmp.path().join("c.yml");
    write(
        &cfg,
        &format!(
            "models:\n  - model: {}\n    parameters: {{weight: 1}}\n  - model: {}\n    parameters: {{weight: 1}}\nmerge_method: linear\n",
            ms[0].display(),
            ms[1].display()
        ),
    );
    let r = json(&check(tmp.path(), &cfg, &["--json"]));
    let tensors: Vec<&str> = r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["code"] == "missing_tensor")
        .map(|p| p["tensor"].as_str().unwrap())
        .collect();
    assert!(
        tensors.contains(&"model.layers.0.mlp.up_proj.weight"),
        "{r}"
    );
    assert!(
        tensors.contains(&"model.layers.1.self_attn.q_proj.weight"),
        "{r}"
    );
    // merge refuses before writing anything, listing both
    let o = merge(tmp.path(), &cfg, &tmp.path().join("out"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("2 problems"), "{}", stderr(&o));
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn strict_turns_warnings_into_errors_for_check_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let ms = write_family(&tmp.path().join("fam"), &LlamaSpec::tiny(), 1, 1, 0.01).unwrap();
    let cfg = tmp.path().join("c.yml");
    write(
        &cfg,
        &format!(
            "models:\n  - model: {}\n    parameters: {{weight: 1, gamma: 3}}\n  - model: {}\n    parameters: {{weight: 1}}\nmerge_method: linear\nlabel: x\n",
            ms[0].display(),
            ms[1].display()
        ),
    );
    let o = check(tmp.path(), &cfg, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 warning(s)"));
    assert_eq!(
        check(tmp.path(), &cfg, &["--strict"]).status.code(),
        Some(1)
    );
    // merge: warnings are printed, the merge succeeds; --strict refuses
    let out = tmp.path().join("out");
    let m = merge(tmp.path(), &cfg, &out, &[]);
    assert_ok(&m);
    assert!(
        stderr(&m).contains("does not use parameter `gamma`"),
        "{}",
        stderr(&m)
    );
    let m = merge(
        tmp.path(),
        &cfg,
        &tmp.path().join("strict-out"),
        &["--strict"],
    );
    assert_eq!(m.status.code(), Some(1));
    assert!(!tmp.path().join("strict-out").exists());
}

#[test]
fn plans_a_70b_merge_from_sparse_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = smelt_core::synth::LlamaSpec::llama3_70b();
    let names = ["base", "ft1", "ft2"];
    for n in names {
        write_llama_sparse(&tmp.path().join(n), &spec).unwrap();
    }
    let shards = std::fs::read_dir(tmp.path().join("base"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".safetensors")
        })
        .count();
    assert!(shards >= 28, "{shards} shards");
    let cfg = tmp.path().join("c.yml");
    write(
        &cfg,
        "models:\n  - model: ft1\n    parameters: {weight: 0.5, density: 0.5}\n  - model: ft2\n    parameters: {weight: 0.5, density: 0.5}\nmerge_method: ties\nbase_model: base\n",
    );
    let r = json(&check(tmp.path(), &cfg, &["--json"]));
    // the only acceptable problem is the (real) lack of 140 GB of free disk
    for p in r["problems"].as_array().unwrap() {
        assert_eq!(p["code"], "disk_space", "{p}");
    }
    let plan = &r["plan"];
    assert_eq!(plan["output_tensors"], 1 + 80 * 9 + 2);
    let params: u64 = spec
        .tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    assert!(params > 70_000_000_000, "{params}");
    assert_eq!(plan["output_bytes"].as_u64().unwrap(), params * 2);
    // mergekit's rule over tensors in ascending name order (spec §5.3)
    let mut ts = spec.tensors();
    ts.sort();
    let (mut shards, mut cur) = (1, 0u64);
    for (_, s) in &ts {
        let b = s.iter().product::<usize>() as u64 * 2;
        if cur > 0 && cur + b > 5_000_000_000 {
            shards += 1;
            cur = 0;
        }
        cur += b;
    }
    assert_eq!(plan["shards"], shards);
}
