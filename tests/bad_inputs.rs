//! A catalogue of malformed inputs for `smelt merge`: broken YAML, wrong
//! field types, missing or corrupt model files, bad safetensors headers,
//! invalid parameters, incompatible models and unusable output paths.
//!
//! Every case runs the real binary and checks that it fails cleanly: a
//! non-zero exit code (1 for bad input, 2 for clap usage errors), no panic,
//! a message that names the offending file, tensor or YAML field, and no
//! output directory or `*.smelt-tmp-*` temporary left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use serde_json::{Map, Value};
use smelt_core::synth::{LlamaSpec, write_family, write_llama};

/// A temporary workspace with a synthetic tiny Llama family in `fam/`
/// (`base`, `ft1`, …).
struct Ws {
    tmp: tempfile::TempDir,
    models: Vec<PathBuf>,
}

impl Ws {
    /// A family with `n` fine-tunes.
    fn new(n: u64) -> Ws {
        let tmp = tempfile::tempdir().expect("tempdir");
        let models =
            write_family(&tmp.path().join("fam"), &LlamaSpec::tiny(), 42, n, 0.01).expect("family");
        Ws { tmp, models }
    }

    /// A workspace without models.
    fn empty() -> Ws {
        Ws {
            tmp: tempfile::tempdir().expect("tempdir"),
            models: vec![],
        }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn m(&self, k: usize) -> String {
        self.models[k].display().to_string()
    }

    /// Writes a sharded (several files) copy of the tiny Llama at `name`.
    fn sharded(&self, name: &str) -> PathBuf {
        let mut spec = LlamaSpec::tiny();
        spec.shard_bytes = 8_000;
        let dir = self.root().join(name);
        write_llama(&dir, &spec, 42, 1, 0.01).expect("sharded model");
        assert!(dir.join("model.safetensors.index.json").exists());
        dir
    }

    /// Writes the config, runs `smelt merge CONFIG OUT --quiet ARGS`.
    fn run_cfg(&self, yaml: &str, args: &[&str]) -> (Output, PathBuf) {
        let cfg = self.root().join("merge.yml");
        write(&cfg, yaml);
        let out = self.root().join("out");
        (merge(self.root(), &cfg, &out, args), out)
    }

    /// Runs the config and checks a clean exit-code-1 failure whose stderr
    /// contains every one of `needles`.
    fn fails(&self, yaml: &str, needles: &[&str]) {
        self.fails_with(yaml, &[], needles);
    }

    fn fails_with(&self, yaml: &str, args: &[&str], needles: &[&str]) {
        let (o, out) = self.run_cfg(yaml, args);
        check_failure(&o, 1, needles);
        assert!(!out.exists(), "output {} must not exist", out.display());
        no_temporaries(self.root());
    }

    /// Like [`Ws::fails`] for a bad value that smelt may report either by
    /// its field path or by its position in the YAML file (the file name
    /// is required either way).
    fn fails_located(&self, yaml: &str, field: &str, position: &str) {
        let (o, out) = self.run_cfg(yaml, &[]);
        check_failure(&o, 1, &["merge.yml"]);
        let err = stderr(&o);
        assert!(
            err.contains(field) || err.contains(position),
            "stderr should name {field:?} or {position:?}:\n{err}"
        );
        assert!(!out.exists(), "output {} must not exist", out.display());
        no_temporaries(self.root());
    }

    /// linear merge of `base` and `ft1` with weight 1 each.
    fn linear2(&self) -> String {
        linear(&[&self.m(0), &self.m(1)])
    }
}

/// A `linear` configuration over `models`, each with weight 1.
fn linear(models: &[&str]) -> String {
    let mut y = String::from("models:\n");
    for m in models {
        y += &format!("  - model: {m}\n    parameters:\n      weight: 1.0\n");
    }
    y + "merge_method: linear\ndtype: float32\n"
}

fn check_failure(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit code {code}, got {}\nstdout: {}\nstderr: {err}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
    );
    assert!(!err.contains("panicked"), "smelt panicked:\n{err}");
    assert!(!err.trim().is_empty(), "stderr is empty");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}:\n{err}");
    }
}

fn no_temporaries(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".smelt-tmp-"))
        .collect();
    assert!(left.is_empty(), "temporaries left in {dir:?}: {left:?}");
}

/// Reads a safetensors file as (header object, data section).
fn read_st(path: &Path) -> (Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).expect("read safetensors");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
    (
        header.as_object().expect("object").clone(),
        bytes[8 + n..].to_vec(),
    )
}

/// Writes raw safetensors bytes: 8-byte little-endian length, header, data.
fn write_st_raw(path: &Path, header: &[u8], data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(data);
    std::fs::write(path, b).expect("write safetensors");
}

/// Rewrites the header of a safetensors file, keeping its data section.
fn edit_header(path: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    let (mut h, data) = read_st(path);
    f(&mut h);
    let hb = serde_json::to_vec(&Value::Object(h)).unwrap();
    write_st_raw(path, &hb, &data);
}

/// The shard file names of a sharded model, sorted.
fn shard_names(dir: &Path) -> Vec<String> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let set: std::collections::BTreeSet<String> = v["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    assert!(set.len() >= 2, "{set:?}");
    set.into_iter().collect()
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";
const K0: &str = "model.layers.0.self_attn.k_proj.weight";
const NORM: &str = "model.norm.weight";

// ---------------------------------------------------------------- YAML ----

#[test]
fn yaml_syntax_error() {
    let ws = Ws::new(1);
    ws.fails(
        "models:\n  - model: [unclosed\nmerge_method: linear\n",
        &["merge.yml"],
    );
}

#[test]
fn yaml_top_level_not_a_mapping() {
    let ws = Ws::new(1);
    ws.fails("- linear\n- ties\n", &["merge.yml"]);
}

#[test]
fn yaml_models_not_a_list() {
    let ws = Ws::new(1);
    ws.fails(
        &format!("models: {}\nmerge_method: linear\n", ws.m(0)),
        &["models"],
    );
}

#[test]
fn yaml_weight_is_a_string() {
    let ws = Ws::new(1);
    let y = ws.linear2().replacen("weight: 1.0", "weight: heavy", 2);
    let y = y.replacen("weight: heavy", "weight: 1.0", 1);
    ws.fails(&y, &["models[1].parameters.weight"]);
}

#[test]
fn yaml_layer_range_not_a_list() {
    let ws = Ws::new(1);
    ws.fails(
        &format!(
            "slices:\n  - sources:\n      - model: {}\n        layer_range: 2\nmerge_method: passthrough\n",
            ws.m(0)
        ),
        &["slices[0].sources[0].layer_range"],
    );
}

#[test]
fn yaml_layer_range_reversed() {
    let ws = Ws::new(1);
    ws.fails(
        &format!(
            "slices:\n  - sources:\n      - model: {}\n        layer_range: [2, 0]\nmerge_method: passthrough\n",
            ws.m(0)
        ),
        &["slices[0].sources[0].layer_range"],
    );
}

#[test]
fn yaml_density_mapping_without_value() {
    let ws = Ws::new(2);
    ws.fails(
        &format!(
            "models:\n  - model: {}\n    parameters:\n      weight: 1.0\n      density: {{filter: mlp}}\n  - model: {}\n    parameters:\n      weight: 1.0\n      density: 0.5\nmerge_method: ties\nbase_model: {}\n",
            ws.m(1),
            ws.m(2),
            ws.m(0)
        ),
        &["models[0].parameters.density"],
    );
}

#[test]
fn yaml_model_entry_without_model() {
    let ws = Ws::new(1);
    ws.fails(
        &format!(
            "models:\n  - model: {}\n  - parameters:\n      weight: 1.0\nmerge_method: linear\n",
            ws.m(0)
        ),
        &["models[1]"],
    );
}

#[test]
fn yaml_missing_merge_method() {
    let ws = Ws::new(1);
    let y = ws.linear2().replace("merge_method: linear\n", "");
    ws.fails(&y, &["merge_method"]);
}

#[test]
fn yaml_unknown_merge_method() {
    let ws = Ws::new(1);
    let y = ws
        .linear2()
        .replace("merge_method: linear", "merge_method: frobnicate");
    ws.fails(&y, &["merge_method", "frobnicate"]);
}

#[test]
fn yaml_unknown_dtype() {
    let ws = Ws::new(1);
    let y = ws.linear2().replace("dtype: float32", "dtype: float17");
    ws.fails(&y, &["dtype", "float17"]);
}

#[test]
fn yaml_unknown_out_dtype() {
    let ws = Ws::new(1);
    let y = ws.linear2() + "out_dtype: int3\n";
    ws.fails(&y, &["out_dtype", "int3"]);
}

#[test]
fn yaml_empty_models_list() {
    let ws = Ws::new(1);
    ws.fails("models: []\nmerge_method: linear\n", &["models"]);
}

#[test]
fn yaml_both_models_and_slices() {
    let ws = Ws::new(1);
    let y = format!(
        "{}slices:\n  - sources:\n      - model: {}\n        layer_range: [0, 2]\n",
        ws.linear2(),
        ws.m(0)
    );
    ws.fails(&y, &["slices"]);
}

#[test]
fn config_file_missing() {
    let ws = Ws::empty();
    let out = ws.root().join("out");
    let o = merge(ws.root(), &ws.root().join("nowhere.yml"), &out, &[]);
    check_failure(&o, 1, &["nowhere.yml"]);
    assert!(!out.exists());
    no_temporaries(ws.root());
}

// ---------------------------------------------------------- CLI usage ----

#[test]
fn cli_unknown_option_is_a_usage_error() {
    let ws = Ws::new(1);
    let (o, out) = ws.run_cfg(&ws.linear2(), &["--frobnicate"]);
    check_failure(&o, 2, &["--frobnicate"]);
    assert!(!out.exists());
    no_temporaries(ws.root());
}

#[test]
fn cli_bad_out_shard_size() {
    let ws = Ws::new(1);
    ws.fails_with(&ws.linear2(), &["--out-shard-size", "lots"], &["lots"]);
}

// ------------------------------------------------------ model folders ----

#[test]
fn model_path_does_not_exist() {
    let ws = Ws::new(1);
    let ghost = ws.root().join("no-such-model");
    ws.fails(
        &linear(&[&ws.m(0), &ghost.display().to_string()]),
        &["no-such-model"],
    );
}

#[test]
fn model_dir_without_config_json() {
    let ws = Ws::new(1);
    std::fs::remove_file(ws.models[1].join("config.json")).unwrap();
    ws.fails(&ws.linear2(), &["ft1", "config.json"]);
}

#[test]
fn config_json_not_json() {
    let ws = Ws::new(1);
    write(&ws.models[1].join("config.json"), "{\"architectures\": [");
    ws.fails(&ws.linear2(), &["ft1", "config.json"]);
}

#[test]
fn config_json_without_architectures() {
    let ws = Ws::new(1);
    edit_json(&ws.models[1].join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("architectures");
    });
    ws.fails(&ws.linear2(), &["ft1", "architectures"]);
}

#[test]
fn model_dir_without_safetensors() {
    let ws = Ws::new(1);
    std::fs::remove_file(ws.models[1].join("model.safetensors")).unwrap();
    ws.fails(&ws.linear2(), &["ft1", "model.safetensors"]);
}

// -------------------------------------------------------------- index ----

#[test]
fn index_names_a_missing_shard() {
    let ws = Ws::new(1);
    let sh = ws.sharded("sharded");
    let second = shard_names(&sh)[1].clone();
    std::fs::remove_file(sh.join(&second)).unwrap();
    ws.fails(&linear(&[&ws.m(0), &sh.display().to_string()]), &[&second]);
}

#[test]
fn index_not_json() {
    let ws = Ws::new(1);
    let sh = ws.sharded("sharded");
    write(&sh.join("model.safetensors.index.json"), "weight_map: nope");
    ws.fails(
        &linear(&[&ws.m(0), &sh.display().to_string()]),
        &["model.safetensors.index.json"],
    );
}

#[test]
fn index_without_weight_map() {
    let ws = Ws::new(1);
    let sh = ws.sharded("sharded");
    write(
        &sh.join("model.safetensors.index.json"),
        "{\"metadata\": {}}",
    );
    ws.fails(
        &linear(&[&ws.m(0), &sh.display().to_string()]),
        &["model.safetensors.index.json", "weight_map"],
    );
}

#[test]
fn index_lists_a_tensor_its_shard_lacks() {
    let ws = Ws::new(1);
    let sh = ws.sharded("sharded");
    let idx = sh.join("model.safetensors.index.json");
    let first = shard_names(&sh)[0].clone();
    edit_json(&idx, |v| {
        v["weight_map"]["model.layers.7.mlp.ghost.weight"] = Value::from(first);
    });
    ws.fails(
        &linear(&[&ws.m(0), &sh.display().to_string()]),
        &["model.layers.7.mlp.ghost.weight"],
    );
}

// --------------------------------------------------------- safetensors ----

/// Corrupts `ft1/model.safetensors` with `f`, runs a linear merge of base
/// and ft1, expects a failure naming `needles`.
fn corrupt_ft1(f: impl FnOnce(&Path), needles: &[&str]) {
    let ws = Ws::new(1);
    f(&ws.models[1].join("model.safetensors"));
    ws.fails(&ws.linear2(), needles);
}

#[test]
fn safetensors_truncated_in_data_section() {
    corrupt_ft1(
        |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() - 100]).unwrap();
        },
        &["ft1", "model.safetensors"],
    );
}

#[test]
fn safetensors_shorter_than_length_prefix() {
    corrupt_ft1(
        |p| std::fs::write(p, [1u8, 2, 3]).unwrap(),
        &["ft1", "model.safetensors"],
    );
}

#[test]
fn safetensors_header_length_past_end_of_file() {
    corrupt_ft1(
        |p| {
            let mut b = std::fs::read(p).unwrap();
            let n = b.len() as u64 + 1000;
            b[..8].copy_from_slice(&n.to_le_bytes());
            std::fs::write(p, b).unwrap();
        },
        &["ft1", "model.safetensors"],
    );
}

#[test]
fn safetensors_header_not_json() {
    corrupt_ft1(
        |p| {
            let (_, data) = read_st(p);
            write_st_raw(p, b"{\"this is\": not json at all   }", &data);
        },
        &["ft1", "model.safetensors"],
    );
}

#[test]
fn safetensors_unknown_tensor_dtype() {
    corrupt_ft1(
        |p| edit_header(p, |h| h[Q0]["dtype"] = Value::from("F8_E9")),
        &["model.safetensors", Q0, "F8_E9"],
    );
}

#[test]
fn safetensors_data_offsets_out_of_range() {
    corrupt_ft1(
        |p| {
            edit_header(p, |h| {
                let (a, b) = offsets(&h[Q0]);
                let shift = 1_000_000;
                h[Q0]["data_offsets"] = serde_json::json!([a + shift, b + shift]);
            })
        },
        &["model.safetensors", Q0],
    );
}

fn offsets(info: &Value) -> (u64, u64) {
    let o = info["data_offsets"].as_array().unwrap();
    (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
}

#[test]
fn safetensors_overlapping_tensors() {
    corrupt_ft1(
        |p| {
            edit_header(p, |h| {
                // k_proj and v_proj have the same shape: point k at q's bytes'
                // tail so the two ranges overlap
                let (qa, _) = offsets(&h[Q0]);
                let (ka, kb) = offsets(&h[K0]);
                let len = kb - ka;
                h[K0]["data_offsets"] = serde_json::json!([qa + 2, qa + 2 + len]);
            })
        },
        &["model.safetensors", "overlap", K0],
    );
}

#[test]
fn safetensors_shape_does_not_match_byte_length() {
    corrupt_ft1(
        |p| edit_header(p, |h| h[NORM]["shape"] = serde_json::json!([33])),
        &["model.safetensors", NORM],
    );
}

#[test]
fn safetensors_minimal_handwritten_bad_dtype() {
    // a hand-written single-tensor file, not derived from the synth writer
    corrupt_ft1(
        |p| {
            write_st_raw(
                p,
                br#"{"w":{"dtype":"Q3","shape":[2],"data_offsets":[0,8]}}"#,
                &[0u8; 8],
            )
        },
        &["model.safetensors", "Q3"],
    );
}

// --------------------------------------------------------- parameters ----

#[test]
fn parameter_nan() {
    let ws = Ws::new(1);
    let y = ws.linear2().replacen("weight: 1.0", "weight: .nan", 2);
    let y = y.replacen("weight: .nan", "weight: 1.0", 1);
    ws.fails_located(&y, "models[1].parameters.weight", "line 7 column 15");
}

#[test]
fn parameter_infinite() {
    let ws = Ws::new(1);
    let y = ws.linear2().replacen("weight: 1.0", "weight: .inf", 2);
    let y = y.replacen("weight: .inf", "weight: 1.0", 1);
    ws.fails_located(&y, "models[1].parameters.weight", "line 7 column 15");
}

#[test]
fn parameter_missing_linear_weight() {
    let ws = Ws::new(1);
    let y = format!(
        "models:\n  - model: {}\n    parameters:\n      weight: 1.0\n  - model: {}\nmerge_method: linear\n",
        ws.m(0),
        ws.m(1)
    );
    ws.fails(&y, &["weight"]);
}

#[test]
fn parameter_missing_slerp_t() {
    let ws = Ws::new(1);
    let y = format!(
        "models:\n  - model: {b}\n  - model: {f}\nmerge_method: slerp\nbase_model: {b}\n",
        b = ws.m(0),
        f = ws.m(1)
    );
    ws.fails(&y, &["t"]);
}

#[test]
fn ties_without_base_model() {
    let ws = Ws::new(2);
    let y = format!(
        "models:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\nmerge_method: ties\n",
        ws.m(1),
        ws.m(2)
    );
    ws.fails(&y, &["base_model"]);
}

#[test]
fn della_epsilon_leaves_unit_interval() {
    let ws = Ws::new(2);
    let y = format!(
        "models:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.6}}\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}\nmerge_method: della\nbase_model: {}\n",
        ws.m(1),
        ws.m(2),
        ws.m(0)
    );
    ws.fails(&y, &["epsilon"]);
}

// ------------------------------------------------------------- slices ----

#[test]
fn slice_layer_range_out_of_bounds() {
    let ws = Ws::new(1);
    let y = format!(
        "slices:\n  - sources:\n      - model: {}\n        layer_range: [0, 2]\n      - model: {}\n        layer_range: [0, 5]\nmerge_method: slerp\nbase_model: {}\nparameters:\n  t: 0.5\n",
        ws.m(0),
        ws.m(1),
        ws.m(0)
    );
    ws.fails(&y, &["slices[0].sources[1].layer_range"]);
}

#[test]
fn slice_sources_of_unequal_length() {
    let ws = Ws::new(1);
    let y = format!(
        "slices:\n  - sources:\n      - model: {}\n        layer_range: [0, 2]\n      - model: {}\n        layer_range: [0, 1]\nmerge_method: slerp\nbase_model: {}\nparameters:\n  t: 0.5\n",
        ws.m(0),
        ws.m(1),
        ws.m(0)
    );
    ws.fails(&y, &["slices[0]", "layer_range"]);
}

/// mergekit 0.1.5 checks every slice against the method's input contract
/// before planning: slerp takes exactly two inputs, the base among them.
#[test]
fn slice_with_one_source_for_slerp() {
    let ws = Ws::new(1);
    let y = format!(
        "slices:\n  - sources:\n      - model: {}\n        layer_range: [0, 2]\nmerge_method: slerp\nbase_model: {}\nparameters:\n  t: 0.5\n",
        ws.m(0),
        ws.m(0)
    );
    ws.fails(&y, &["slices[0].sources", "exactly 2 inputs; got 1"]);
    let y = format!(
        "slices:\n  - sources:\n      - model: {}\n        layer_range: [0, 2]\nmerge_method: slerp\nbase_model: {}\nparameters:\n  t: 0.5\n",
        ws.m(1),
        ws.m(0)
    );
    ws.fails(&y, &["slices[0].sources", "not among the inputs"]);
}

/// multislerp with the base alone (it used to panic on an empty input list).
#[test]
fn multislerp_with_only_the_base() {
    let ws = Ws::new(1);
    let y = format!(
        "models:\n  - model: {}\n    parameters:\n      weight: 1.0\nmerge_method: multislerp\nbase_model: {}\n",
        ws.m(0),
        ws.m(0)
    );
    ws.fails(&y, &["models", "at least 1 non-base inputs; got 0"]);
}

/// Boolean parameters take true/false or 1/0 (mergekit 0.1.5 validates
/// them): `normalize: 2` is a mistake.
#[test]
fn boolean_parameter_given_a_number() {
    let ws = Ws::new(1);
    let y = ws.linear2() + "parameters:\n  normalize: 2\n";
    ws.fails(&y, &["normalize", "not a boolean"]);
}

// ------------------------------------------------ incompatible models ----

#[test]
fn architecture_mismatch_without_allow_crimes() {
    let ws = Ws::new(1);
    edit_json(&ws.models[1].join("config.json"), |v| {
        v["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        v["model_type"] = Value::from("mistral");
    });
    ws.fails(&ws.linear2(), &["--allow-crimes"]);
}

#[test]
fn tensor_missing_from_one_model() {
    let ws = Ws::new(1);
    let p = ws.models[1].join("model.safetensors");
    // rewrite ft1 without q_proj of layer 0 (data section compacted)
    let (h, data) = read_st(&p);
    let mut slots: Vec<(String, Value)> = h
        .into_iter()
        .filter(|(k, _)| k != "__metadata__" && k != Q0)
        .collect();
    slots.sort_by_key(|(_, v)| offsets(v).0);
    let mut nh = Map::new();
    let mut nd = Vec::new();
    for (k, mut v) in slots {
        let (a, b) = offsets(&v);
        let start = nd.len() as u64;
        nd.extend_from_slice(&data[a as usize..b as usize]);
        v["data_offsets"] = serde_json::json!([start, nd.len() as u64]);
        nh.insert(k, v);
    }
    write_st_raw(&p, &serde_json::to_vec(&Value::Object(nh)).unwrap(), &nd);
    ws.fails(&ws.linear2(), &[Q0]);
}

#[test]
fn incompatible_shapes_for_linear() {
    let ws = Ws::new(1);
    let mut wide = LlamaSpec::tiny();
    wide.hidden = 48;
    wide.heads = 4;
    let w = ws.root().join("wide");
    write_llama(&w, &wide, 42, 1, 0.01).unwrap();
    ws.fails(
        &linear(&[&ws.m(0), &w.display().to_string()]),
        &["model.", "shape"],
    );
}

// ------------------------------------------------------------- output ----

#[test]
fn output_is_an_existing_file() {
    let ws = Ws::new(1);
    let cfg = ws.root().join("merge.yml");
    write(&cfg, &ws.linear2());
    let file = ws.root().join("precious.bin");
    write(&file, "precious");
    let o = merge(ws.root(), &cfg, &file, &[]);
    check_failure(&o, 1, &["precious.bin"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    no_temporaries(ws.root());
}

#[test]
fn output_dir_not_empty_without_overwrite() {
    let ws = Ws::new(1);
    let cfg = ws.root().join("merge.yml");
    write(&cfg, &ws.linear2());
    let out = ws.root().join("out");
    std::fs::create_dir(&out).unwrap();
    write(&out.join("old.txt"), "old");
    let o = merge(ws.root(), &cfg, &out, &[]);
    check_failure(&o, 1, &["--overwrite"]);
    assert_eq!(dir_bytes(&out).len(), 1);
    assert_eq!(std::fs::read_to_string(out.join("old.txt")).unwrap(), "old");
    no_temporaries(ws.root());
}

#[test]
fn output_parent_not_writable() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Ws::new(1);
    let cfg = ws.root().join("merge.yml");
    write(&cfg, &ws.linear2());
    let locked = ws.root().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    // root ignores permission bits: only trust the read-only directory when
    // a probe write really fails there
    let probe = locked.join("probe");
    let bits_hold = std::fs::write(&probe, "x").is_err();
    let _ = std::fs::remove_file(&probe);
    let out = if bits_hold {
        locked.join("out")
    } else {
        // running as root: a parent that is a regular file cannot be
        // written by anyone
        let f = ws.root().join("plainfile");
        write(&f, "not a directory");
        f.join("out")
    };
    let o = merge(ws.root(), &cfg, &out, &[]);
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let parent = out.parent().unwrap();
    let pname = parent.file_name().unwrap().to_string_lossy().to_string();
    check_failure(&o, 1, &[&pname]);
    assert!(!out.exists());
    if parent.is_dir() {
        no_temporaries(parent);
    }
    no_temporaries(ws.root());
}

#[test]
fn output_under_proc_is_refused() {
    // /proc refuses new directories even for root
    let ws = Ws::new(1);
    let cfg = ws.root().join("merge.yml");
    write(&cfg, &ws.linear2());
    let out = Path::new("/proc/smelt-bad-inputs-out");
    let o = merge(ws.root(), &cfg, out, &[]);
    check_failure(&o, 1, &["/proc"]);
    assert!(!out.exists());
    no_temporaries(ws.root());
}
