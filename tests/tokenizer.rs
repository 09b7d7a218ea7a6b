//! Tokenizer merging (`tokenizer_source`, `tokenizer:`) and chat templates,
//! following mergekit's own tokenizer tests (spec §10.3) on synthetic models.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use smelt_core::DType;
use smelt_core::synth::{LlamaSpec, tokenizer_json, write_llama};

struct Fixtures {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    chatml: PathBuf,
    padded: PathBuf,
}

fn fixtures() -> Fixtures {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let spec = |vocab| LlamaSpec {
        vocab,
        dtype: DType::F32,
        ..LlamaSpec::tiny()
    };
    let mk = |name: &str, rows: usize, extra: &[&str], variant: u64| {
        let d = root.join(name);
        write_llama(&d, &spec(rows), 1, variant, 0.05).unwrap();
        write(
            &d.join("tokenizer.json"),
            &tokenizer_json(64, extra).to_string(),
        );
        d
    };
    let base = mk("base", 64, &[], 0);
    let chatml = mk("chatml", 66, &["<|im_start|>", "<|im_end|>"], 1);
    let padded = mk(
        "padded",
        64,
        &["<UNUSED_0>", "<UNUSED_1>", "<UNUSED_2>", "<UNUSED_3>"],
        2,
    );
    Fixtures {
        _tmp: tmp,
        root,
        base,
        chatml,
        padded,
    }
}

fn vocab(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    let tj: Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let mut m: std::collections::BTreeMap<String, u64> = tj["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    for t in tj["added_tokens"].as_array().unwrap() {
        m.insert(
            t["content"].as_str().unwrap().to_string(),
            t["id"].as_u64().unwrap(),
        );
    }
    m
}

fn run(
    f: &Fixtures,
    models: &[&Path],
    base: &Path,
    extra: &str,
) -> (
    PathBuf,
    std::collections::BTreeMap<String, smelt_core::Tensor>,
) {
    let mut y = String::from("models:\n");
    for m in models {
        y += &format!(
            "  - model: {}\n    parameters: {{weight: 1.0}}\n",
            m.display()
        );
    }
    y += &format!(
        "merge_method: linear\nbase_model: {}\ndtype: float32\n{extra}",
        base.display()
    );
    let n = std::fs::read_dir(&f.root).unwrap().count();
    let cfg = f.root.join(format!("c{n}.yml"));
    write(&cfg, &y);
    let out = f.root.join(format!("out{n}"));
    assert_ok(&merge(&f.root, &cfg, &out, &[]));
    let vals = read_values(&out);
    (out, vals)
}

fn row(t: &smelt_core::Tensor, r: usize) -> Vec<f32> {
    let d = t.shape[1];
    t.data[r * d..(r + 1) * d].to_vec()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5)
}

#[test]
fn legacy_mode_copies_base_tokenizer_and_truncates() {
    let f = fixtures();
    let (out, v) = run(&f, &[&f.base, &f.chatml], &f.base, "");
    assert_eq!(vocab(&out).len(), 64);
    assert_eq!(
        v["model.embed_tokens.weight"].shape[0], 64,
        "common sub-matrix"
    );
}

#[test]
fn source_base() {
    let f = fixtures();
    let (out, v) = run(
        &f,
        &[&f.base, &f.chatml],
        &f.base,
        "tokenizer_source: base\n",
    );
    assert_eq!(vocab(&out).len(), 64);
    assert_eq!(v["model.embed_tokens.weight"].shape[0], 64);
}

#[test]
fn source_union_keeps_chatml_rows_and_drops_padding_tokens() {
    let f = fixtures();
    let (out, v) = run(
        &f,
        &[&f.base, &f.chatml, &f.padded],
        &f.base,
        "tokenizer_source: union\n",
    );
    let voc = vocab(&out);
    assert_eq!(voc.len(), 66, "{voc:?}");
    assert_eq!(voc["<|im_start|>"], 64);
    assert_eq!(voc["<|im_end|>"], 65);
    assert!(!voc.keys().any(|k| k.starts_with("<UNUSED")));
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 66);
    let chat = read_values(&f.chatml);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        assert_eq!(v[name].shape, vec![66, 32]);
        assert!(
            close(&row(&v[name], 64), &row(&chat[name], 64)),
            "{name} <|im_start|>"
        );
        assert!(
            close(&row(&v[name], 65), &row(&chat[name], 65)),
            "{name} <|im_end|>"
        );
    }
    // shared tokens are the plain average of the three models
    let b = read_values(&f.base);
    let p = read_values(&f.padded);
    let e = "model.embed_tokens.weight";
    let avg: Vec<f32> = (0..32)
        .map(|c| (row(&b[e], 7)[c] + row(&chat[e], 7)[c] + row(&p[e], 7)[c]) / 3.0)
        .collect();
    assert!(close(&row(&v[e], 7), &avg));
}

#[test]
fn source_model() {
    let f = fixtures();
    let cfg = format!("tokenizer_source: {}\n", f.chatml.display());
    let (out, v) = run(&f, &[&f.base, &f.chatml], &f.base, &cfg);
    assert_eq!(vocab(&out).len(), 66);
    assert_eq!(v["model.embed_tokens.weight"].shape[0], 66);
}

#[test]
fn forced_token_sources() {
    let f = fixtures();
    let extra = format!(
        "tokenizer:\n  source: union\n  tokens:\n    tok_10:\n      source: {c}\n      force: true\n    tok_11:\n      source: {b}\n      force: true\n",
        c = f.chatml.display(),
        b = f.base.display()
    );
    let (_, v) = run(&f, &[&f.base, &f.chatml], &f.base, &extra);
    let e = "model.embed_tokens.weight";
    assert!(close(&row(&v[e], 10), &row(&read_values(&f.chatml)[e], 10)));
    assert!(close(&row(&v[e], 11), &row(&read_values(&f.base)[e], 11)));
}

#[test]
fn model_token_sources() {
    let f = fixtures();
    let extra = format!(
        "tokenizer:\n  source: base\n  tokens:\n    tok_20:\n      source: {{kind: model_token, model: {c}, token_id: 64}}\n      force: true\n    tok_21:\n      source: {{kind: model_token, model: {b}, token: \"<s>\"}}\n      force: true\n",
        c = f.chatml.display(),
        b = f.base.display()
    );
    let (_, v) = run(&f, &[&f.base, &f.chatml], &f.base, &extra);
    let e = "model.embed_tokens.weight";
    assert!(close(&row(&v[e], 20), &row(&read_values(&f.chatml)[e], 64)));
    assert!(close(&row(&v[e], 21), &row(&read_values(&f.base)[e], 1)));
}

#[test]
fn pad_to_multiple_of() {
    let f = fixtures();
    let (out, v) = run(
        &f,
        &[&f.chatml],
        &f.chatml,
        "tokenizer:\n  source: base\n  pad_to_multiple_of: 16\n",
    );
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 80);
    assert_eq!(v["model.embed_tokens.weight"].shape[0], 80);
    assert_eq!(vocab(&out).len(), 66);
    // padding rows are the mean of the real rows
    let e = &v["model.embed_tokens.weight"];
    let mean: Vec<f32> = (0..32)
        .map(|c| (0..66).map(|r| row(e, r)[c] as f64).sum::<f64>() as f32 / 66.0)
        .collect();
    assert!(close(&row(e, 79), &mean));
}

#[test]
fn chat_templates() {
    let f = fixtures();
    let (out, _) = run(
        &f,
        &[&f.base, &f.chatml],
        &f.base,
        "chat_template: chatml\n",
    );
    let t = std::fs::read_to_string(out.join("chat_template.jinja")).unwrap();
    assert!(t.contains("<|im_start|>"));
    let lit = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
    let (out, _) = run(
        &f,
        &[&f.base, &f.chatml],
        &f.base,
        &format!("chat_template: \"{lit}\"\n"),
    );
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        lit
    );
    // too short and no braces: refused before any work
    let cfg = f.root.join("bad-ct.yml");
    write(
        &cfg,
        &format!(
            "models:\n  - model: {b}\n    parameters: {{weight: 1}}\nmerge_method: linear\nchat_template: nope\n",
            b = f.base.display()
        ),
    );
    let o = merge(&f.root, &cfg, &f.root.join("bad-ct-out"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("chat_template"), "{}", stderr(&o));
}
