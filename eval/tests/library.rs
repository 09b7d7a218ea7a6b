//! The library API: a model built from an in-memory tensor map (as the merge
//! executor holds it) scores exactly like the same model read from disk.

use std::collections::HashMap;
use std::path::PathBuf;

use smelt_eval::score::{ScoreOptions, Task, score_task};
use smelt_eval::{Device, Model, ModelConfig, load_model};

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/eval/models")
        .join(name)
}

fn core_tensors(name: &str) -> HashMap<String, smelt_core::tensor::Tensor> {
    let map = smelt_eval::model::read_safetensors_dir(&model_dir(name), &Device::Cpu).unwrap();
    map.into_iter()
        .map(|(k, t)| {
            let shape = t.dims().to_vec();
            let data = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (
                k,
                smelt_core::tensor::Tensor::new(shape, data, smelt_core::dtype::DType::F32),
            )
        })
        .collect()
}

fn config(name: &str) -> ModelConfig {
    let text = std::fs::read_to_string(model_dir(name).join("config.json")).unwrap();
    ModelConfig::from_json(&serde_json::from_str(&text).unwrap()).unwrap()
}

#[test]
fn in_memory_model_scores_like_the_files() {
    for name in ["eval_llama", "eval_qwen2"] {
        let loaded = load_model(&model_dir(name), &Device::Cpu).unwrap();
        let mem = Model::from_tensors(config(name), core_tensors(name), &Device::Cpu).unwrap();
        let tok = loaded.tokenizer.as_ref().unwrap();
        let tasks = [
            Task::parse("{\"text\": \"the quick brown fox\"}\n{\"text\": \"jumps over the lazy dog\"}").unwrap(),
            Task::parse("{\"context\": \"the quick\", \"choices\": [\" fox\", \" dog\", \" cat\"], \"answer\": 0}").unwrap(),
            Task::parse("{\"prompt\": \"the\", \"answer\": \"x\", \"max_new_tokens\": 4}").unwrap(),
        ];
        for task in &tasks {
            let a = score_task(&loaded.model, tok, task, &ScoreOptions::default()).unwrap();
            let b = score_task(&mem, tok, task, &ScoreOptions::default()).unwrap();
            assert_eq!(a, b, "{name}: {task:?}");
        }
        let seqs = vec![vec![3u32, 50, 60, 70], vec![9, 8]];
        assert_eq!(
            smelt_eval::logprobs::sequence_logprobs(&loaded.model, &seqs).unwrap(),
            smelt_eval::logprobs::sequence_logprobs(&mem, &seqs).unwrap()
        );
    }
}

#[test]
fn in_memory_model_errors_name_the_tensor() {
    let mut t = core_tensors("eval_llama");
    t.remove("model.layers.1.mlp.up_proj.weight");
    let e = Model::from_tensors(config("eval_llama"), t, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");

    let mut t = core_tensors("eval_llama");
    let w = t.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
    w.shape = vec![w.shape[1], w.shape[0]];
    let e = Model::from_tensors(config("eval_llama"), t, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("k_proj") && e.contains("shape"), "{e}");
}

#[test]
fn greedy_batches_agree_with_single_prompts() {
    // Left padding + masks must not change what each prompt generates.
    let loaded = load_model(&model_dir("eval_qwen2"), &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![5], vec![10, 20, 30, 40, 50, 60], vec![7, 8, 9]];
    let max = vec![6, 6, 6];
    let none = std::collections::BTreeSet::new();
    let batched =
        smelt_eval::generate::greedy(&loaded.model, &prompts, &max, &none, 8, &|_, _| false)
            .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let one = smelt_eval::generate::greedy(
            &loaded.model,
            std::slice::from_ref(p),
            &[6],
            &none,
            1,
            &|_, _| false,
        )
        .unwrap();
        assert_eq!(one[0], batched[i], "prompt {i}");
        assert_eq!(one[0].len(), 6);
        // The first greedy token is the argmax of a plain full forward pass.
        let pos: Vec<i64> = (0..p.len() as i64).collect();
        let h = loaded
            .model
            .forward(std::slice::from_ref(p), &[pos], None)
            .unwrap();
        let last = h.narrow(1, p.len() - 1, 1).unwrap().squeeze(1).unwrap();
        let lp = loaded
            .model
            .log_probs(&last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let best = (0..lp.len()).fold(0, |b, i| if lp[i] > lp[b] { i } else { b });
        assert_eq!(one[0][0], best as u32, "prompt {i}");
    }
}

#[test]
fn sliding_window_attention_limits_what_a_position_sees() {
    // eval_llama's weights as a mistral with a sliding window of 1: every
    // position attends to itself only, so the prediction after a token
    // depends on that token alone (not on earlier tokens or its position).
    let text = std::fs::read_to_string(model_dir("eval_llama").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["model_type"] = "mistral".into();
    v["sliding_window"] = 1.into();
    let cfg = ModelConfig::from_json(&v).unwrap();
    let m = Model::from_tensors(cfg, core_tensors("eval_llama"), &Device::Cpu).unwrap();
    let lp =
        |s: &[u32]| smelt_eval::logprobs::sequence_logprobs(&m, &[s.to_vec()]).unwrap()[0].clone();
    let a = lp(&[5, 7, 9]);
    let b = lp(&[8, 7, 9]);
    let c = lp(&[7, 9]);
    assert!(
        (a[1] - b[1]).abs() < 1e-5 && (a[1] - c[0]).abs() < 1e-5,
        "{a:?} {b:?} {c:?}"
    );
    // A window covering the sequence is full attention; there, context matters.
    v["sliding_window"] = 64.into();
    let wide = Model::from_tensors(
        ModelConfig::from_json(&v).unwrap(),
        core_tensors("eval_llama"),
        &Device::Cpu,
    )
    .unwrap();
    let full = load_model(&model_dir("eval_llama"), &Device::Cpu).unwrap();
    let seqs = vec![vec![5u32, 7, 9, 11, 13]];
    let x = smelt_eval::logprobs::sequence_logprobs(&wide, &seqs).unwrap();
    let y = smelt_eval::logprobs::sequence_logprobs(&full.model, &seqs).unwrap();
    assert_eq!(x, y);
    let f = |s: &[u32]| {
        smelt_eval::logprobs::sequence_logprobs(&full.model, &[s.to_vec()]).unwrap()[0].clone()
    };
    assert!((f(&[5, 7, 9])[1] - f(&[8, 7, 9])[1]).abs() > 1e-4);
}

#[test]
fn tied_embeddings_use_the_embedding_as_lm_head() {
    // The same model twice: once with lm_head.weight = a copy of the
    // embedding, once tied (no lm_head tensor): identical numbers.
    let mut t = core_tensors("eval_qwen2");
    let embed = t["model.embed_tokens.weight"].clone();
    t.insert("lm_head.weight".into(), embed);
    let untied = Model::from_tensors(config("eval_qwen2"), t, &Device::Cpu).unwrap();
    let mut t = core_tensors("eval_qwen2");
    t.remove("lm_head.weight");
    let mut cfg = config("eval_qwen2");
    cfg.tie_word_embeddings = true;
    let tied = Model::from_tensors(cfg, t, &Device::Cpu).unwrap();
    let seqs = vec![vec![3u32, 50, 60, 70, 80]];
    let a = smelt_eval::logprobs::sequence_logprobs(&untied, &seqs).unwrap();
    let b = smelt_eval::logprobs::sequence_logprobs(&tied, &seqs).unwrap();
    assert_eq!(a, b);
    // ...and differ from the model's own (untied) lm_head.
    let own = load_model(&model_dir("eval_qwen2"), &Device::Cpu).unwrap();
    let c = smelt_eval::logprobs::sequence_logprobs(&own.model, &seqs).unwrap();
    assert_ne!(a, c);
}

/// The packed CPU kernels (GEMM, fused attention, SwiGLU, log-softmax pick)
/// give what candle's ops give, on every model variant the fixtures have:
/// biases (qwen2), sliding windows, padded batches and the KV cache.
#[test]
fn packed_kernels_agree_with_candle_ops() {
    if !smelt_eval::cpu::available() {
        eprintln!("no AVX-512 on this CPU: only candle's ops run here");
        return;
    }
    let seqs = vec![
        vec![
            3u32, 50, 60, 70, 80, 90, 100, 110, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
        ],
        vec![9, 8],
        vec![1, 2, 3, 4, 5],
    ];
    for name in ["eval_llama", "eval_qwen2"] {
        let map =
            || smelt_eval::model::read_safetensors_dir(&model_dir(name), &Device::Cpu).unwrap();
        let packed = Model::build(config(name), map(), &Device::Cpu, true).unwrap();
        let plain = Model::build(config(name), map(), &Device::Cpu, false).unwrap();
        assert!(packed.is_packed() && !plain.is_packed());
        let a = smelt_eval::logprobs::sequence_logprobs(&packed, &seqs).unwrap();
        let b = smelt_eval::logprobs::sequence_logprobs(&plain, &seqs).unwrap();
        for (ra, rb) in a.iter().zip(&b) {
            assert_eq!(ra.len(), rb.len());
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-5, "{name}: {x} vs {y}");
            }
        }
        let none = std::collections::BTreeSet::new();
        let prompts: Vec<Vec<u32>> = vec![vec![5], vec![10, 20, 30, 40, 50, 60], vec![7, 8, 9]];
        let g = |m: &Model| {
            smelt_eval::generate::greedy(m, &prompts, &[8, 8, 8], &none, 8, &|_, _| false).unwrap()
        };
        assert_eq!(g(&packed), g(&plain), "{name}");
    }
}
