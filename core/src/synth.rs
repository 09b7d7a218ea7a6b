//! Synthetic model families: Llama-shaped checkpoints with deterministic
//! pseudo-random weights, for tests, examples and benchmarks. A "family" is a
//! base plus fine-tunes whose weights are the base plus small deltas, like
//! real fine-tunes.

use std::path::Path;

use serde_json::json;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::writer::{ShardWriter, SlotSpec};
use crate::rng::Stream;

/// Shape of a synthetic Llama model.
#[derive(Debug, Clone)]
pub struct LlamaSpec {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dtype: DType,
    /// Write `lm_head.weight` (false: tied embeddings).
    pub lm_head: bool,
    /// Shard size limit in bytes (0: one file).
    pub shard_bytes: u64,
}

impl LlamaSpec {
    pub fn tiny() -> LlamaSpec {
        LlamaSpec {
            layers: 2,
            hidden: 32,
            intermediate: 64,
            vocab: 64,
            heads: 4,
            kv_heads: 2,
            dtype: DType::BF16,
            lm_head: true,
            shard_bytes: 0,
        }
    }

    /// Llama-3-70B's shapes (80 layers, hidden 8192, GQA 64/8, vocab
    /// 128256), bf16, ~5 GB shards: for header-only planning at scale.
    pub fn llama3_70b() -> LlamaSpec {
        LlamaSpec {
            layers: 80,
            hidden: 8192,
            intermediate: 28672,
            vocab: 128256,
            heads: 64,
            kv_heads: 8,
            dtype: DType::BF16,
            lm_head: true,
            shard_bytes: 5_000_000_000,
        }
    }

    /// Tensor names and shapes, in checkpoint order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let kv = h / self.heads * self.kv_heads;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if self.lm_head {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    pub fn config(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "dtype": self.dtype.config_name(),
            "eos_token_id": 2,
            "head_dim": self.hidden / self.heads,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 256,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": !self.lm_head,
            "vocab_size": self.vocab,
        })
    }
}

/// Deterministic weight value: base ~ U(-0.05, 0.05) (norms near 1), plus a
/// delta of scale `delta` for variant `variant` (0 = the base itself).
pub fn weight_value(seed: u64, name: &str, i: usize, variant: u64, delta: f32) -> f32 {
    let base = Stream::new(seed, name, "base");
    let mut v = if name.ends_with("layernorm.weight") || name.ends_with("norm.weight") {
        1.0 + (base.uniform(i as u64) - 0.5) * 0.1
    } else {
        (base.uniform(i as u64) - 0.5) * 0.1
    };
    if variant > 0 {
        let d = Stream::new(seed, name, &format!("delta:{variant}"));
        v += (d.uniform(i as u64) - 0.5) * 2.0 * delta;
    }
    v
}

/// Writes one model (config.json, safetensors shards + index, a minimal
/// tokenizer) into `dir`.
pub fn write_llama(
    dir: &Path,
    spec: &LlamaSpec,
    seed: u64,
    variant: u64,
    delta: f32,
) -> Result<()> {
    write_llama_impl(dir, spec, seed, variant, delta, true)
}

/// Like [`write_llama`] but writes only headers: shard files get their full
/// length as sparse files (no data blocks), for planning tests at 70B scale.
pub fn write_llama_sparse(dir: &Path, spec: &LlamaSpec) -> Result<()> {
    write_llama_impl(dir, spec, 0, 0, 0.0, false)
}

fn write_llama_impl(
    dir: &Path,
    spec: &LlamaSpec,
    seed: u64,
    variant: u64,
    delta: f32,
    data: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = spec.tensors();
    // group into shards
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut cur = 0u64;
    for (n, s) in tensors {
        let b = s.iter().product::<usize>() as u64 * spec.dtype.size() as u64;
        if spec.shard_bytes > 0 && cur > 0 && cur + b > spec.shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        cur += b;
        shards.last_mut().expect("non-empty").push((n, s));
    }
    let count = shards.len();
    let names: Vec<String> = (0..count)
        .map(|k| {
            if count == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, count)
            }
        })
        .collect();
    let specs: Vec<(String, Vec<SlotSpec>)> = shards
        .iter()
        .zip(&names)
        .map(|(g, f)| {
            (
                f.clone(),
                g.iter()
                    .map(|(n, s)| SlotSpec {
                        name: n.clone(),
                        dtype: spec.dtype,
                        shape: s.clone(),
                    })
                    .collect(),
            )
        })
        .collect();
    let w = ShardWriter::create(dir, &specs)?;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (k, g) in shards.iter().enumerate() {
        for (slot, (n, s)) in g.iter().enumerate() {
            let numel: usize = s.iter().product();
            total += (numel * spec.dtype.size()) as u64;
            if data {
                let vals = crate::methods::map_n(numel, |i| {
                    spec.dtype.round(weight_value(seed, n, i, variant, delta))
                });
                w.write(k, slot, &crate::dtype::encode_par(spec.dtype, &vals))?;
            }
            weight_map.insert(n.clone(), json!(names[k]));
        }
    }
    w.finish()?;
    if count > 1 {
        let idx = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        crate::output::write_file(
            dir,
            "model.safetensors.index.json",
            &crate::output::pretty_json(&idx),
        )?;
    }
    crate::output::write_file(
        dir,
        "config.json",
        &crate::output::pretty_json(&spec.config()),
    )?;
    crate::output::write_file(
        dir,
        "tokenizer.json",
        &crate::output::pretty_json(&tokenizer_json(spec.vocab, &[])),
    )?;
    crate::output::write_file(
        dir,
        "tokenizer_config.json",
        &crate::output::pretty_json(
            &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "TokenizersBackend"}),
        ),
    )?;
    Ok(())
}

/// A minimal BPE tokenizer.json: `<unk> <s> </s>` then `tok_3 …`, plus
/// `extra` added tokens appended after the vocabulary.
pub fn tokenizer_json(vocab: usize, extra: &[&str]) -> serde_json::Value {
    let mut v = serde_json::Map::new();
    let special = ["<unk>", "<s>", "</s>"];
    for i in 0..vocab {
        let t = special
            .get(i)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("tok_{i}"));
        v.insert(t, json!(i));
    }
    let mut added: Vec<serde_json::Value> = special
        .iter()
        .enumerate()
        .take(vocab)
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    for (k, t) in extra.iter().enumerate() {
        added.push(json!({"id": vocab + k, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": v, "merges": []}
    })
}

/// Writes `base` + `n` fine-tunes under `root` (`base`, `ft1`, …).
pub fn write_family(
    root: &Path,
    spec: &LlamaSpec,
    seed: u64,
    n: u64,
    delta: f32,
) -> Result<Vec<std::path::PathBuf>> {
    let mut dirs = vec![root.join("base")];
    write_llama(&dirs[0], spec, seed, 0, delta)?;
    for k in 1..=n {
        let d = root.join(format!("ft{k}"));
        write_llama(&d, spec, seed, k, delta)?;
        dirs.push(d);
    }
    Ok(dirs)
}
