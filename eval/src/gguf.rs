//! `.gguf` models (llama.cpp): read with candle's GGUF reader, dequantize to
//! f32, map llama.cpp tensor names back to Hugging Face names, undo the q/k
//! row permutation llama.cpp's converter applies, and build the tokenizer
//! from the metadata the way transformers' GGUF loader does (byte-level BPE
//! from `tokenizer.ggml.tokens` + `merges`; control tokens special; BOS only
//! when `tokenizer.ggml.add_bos_token` is true).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{Device, Tensor};
use serde_json::{Value, json};

use crate::config::{AttentionKind, ModelConfig, RopeScaling};
use crate::model::{LoadedModel, Model};
use crate::tokenizer::TextTokenizer;
use crate::{Ctx, Result, c, err};

fn meta<'a>(content: &'a Content, key: &str) -> Option<&'a GValue> {
    content.metadata.get(key)
}

fn as_u64(v: &GValue) -> Option<u64> {
    match v {
        GValue::U8(x) => Some(*x as u64),
        GValue::U16(x) => Some(*x as u64),
        GValue::U32(x) => Some(*x as u64),
        GValue::U64(x) => Some(*x),
        GValue::I8(x) if *x >= 0 => Some(*x as u64),
        GValue::I16(x) if *x >= 0 => Some(*x as u64),
        GValue::I32(x) if *x >= 0 => Some(*x as u64),
        GValue::I64(x) if *x >= 0 => Some(*x as u64),
        _ => None,
    }
}

fn as_f64(v: &GValue) -> Option<f64> {
    match v {
        GValue::F32(x) => Some(*x as f64),
        GValue::F64(x) => Some(*x),
        other => as_u64(other).map(|x| x as f64),
    }
}

/// Undoes llama.cpp's `permute(w, n_head)` on the rows of a q/k weight:
/// GGUF row (h, i, a) → HF row (h, a, i), with a ∈ {0, 1}.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = c(w.dims2())?;
    if rows % (2 * n_head) != 0 {
        return err(format!(
            "q/k weight with {rows} rows cannot be split into {n_head} heads"
        ));
    }
    let half = rows / n_head / 2;
    let t = c(w.reshape((n_head, half, 2, cols)))?;
    let t = c(c(t.transpose(1, 2))?.contiguous())?;
    c(t.reshape((rows, cols)))
}

/// The inverse of [`unpermute_qk`] (what llama.cpp's converter does); used to
/// build GGUF test files.
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = c(w.dims2())?;
    let half = rows / n_head / 2;
    let t = c(w.reshape((n_head, 2, half, cols)))?;
    let t = c(c(t.transpose(1, 2))?.contiguous())?;
    c(t.reshape((rows, cols)))
}

/// llama.cpp tensor name → Hugging Face name (llama architecture).
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match tail {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "rope_freqs.weight" => return Some(String::new()), // llama3 factors, recomputed from metadata
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Loads a `.gguf` model (llama architecture) with its tokenizer.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
    let what = path.display().to_string();
    let mut file = std::fs::File::open(path).ctx(|| what.clone())?;
    let content = Content::read(&mut file).ctx(|| format!("{what}: reading GGUF header"))?;
    let arch = meta(&content, "general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if arch != "llama" && arch != "qwen2" && arch != "mistral" {
        return err(format!(
            "{what}: GGUF architecture `{arch}` is not supported (llama, mistral, qwen2)"
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let req = |k: &str| -> Result<u64> {
        meta(&content, &key(k))
            .and_then(as_u64)
            .ok_or_else(|| crate::Error::Msg(format!("{what}: missing GGUF metadata `{}`", key(k))))
    };
    let hidden = req("embedding_length")? as usize;
    let heads = req("attention.head_count")? as usize;
    let kv_heads = meta(&content, &key("attention.head_count_kv"))
        .and_then(as_u64)
        .map_or(heads, |x| x as usize);
    let layers = req("block_count")? as usize;
    let inter = req("feed_forward_length")? as usize;
    let head_dim = meta(&content, &key("attention.key_length"))
        .and_then(as_u64)
        .map_or(hidden / heads.max(1), |x| x as usize);
    let eps = meta(&content, &key("attention.layer_norm_rms_epsilon"))
        .and_then(as_f64)
        .unwrap_or(1e-5);
    let theta = meta(&content, &key("rope.freq_base"))
        .and_then(as_f64)
        .unwrap_or(10000.0);
    let ctx_len = meta(&content, &key("context_length"))
        .and_then(as_u64)
        .unwrap_or(0) as usize;
    // Without tokenizer metadata the model still scores token ids.
    let tokens: Option<Vec<String>> = match meta(&content, "tokenizer.ggml.tokens") {
        Some(GValue::Array(a)) => Some(
            a.iter()
                .map(|v| v.to_string().cloned().unwrap_or_default())
                .collect(),
        ),
        _ => None,
    };
    let embd_info = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| crate::Error::Msg(format!("{what}: missing tensor `token_embd.weight`")))?;
    let vocab = embd_info.shape.dims()[0];
    let tok_id = |k: &str| meta(&content, k).and_then(as_u64).map(|x| x as u32);
    let bos = tok_id("tokenizer.ggml.bos_token_id");
    let eos = tok_id("tokenizer.ggml.eos_token_id");
    let rope_scaling = match meta(&content, &key("rope.scaling.type"))
        .and_then(|v| v.to_string().ok().cloned())
        .as_deref()
    {
        None | Some("none") => RopeScaling::Default,
        Some("linear") => RopeScaling::Linear {
            factor: meta(&content, &key("rope.scaling.factor"))
                .and_then(as_f64)
                .unwrap_or(1.0),
        },
        Some(other) => {
            return err(format!(
                "{what}: GGUF rope scaling `{other}` is not supported"
            ));
        }
    };
    let model_type = match arch.as_str() {
        "llama" => "llama",
        "mistral" => "mistral",
        _ => "qwen2",
    };
    let config = ModelConfig {
        model_type: model_type.into(),
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: eps,
        rope_theta: theta,
        rope_scaling,
        partial_rotary_factor: 1.0,
        max_position_embeddings: ctx_len,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        hidden_act: crate::config::Activation::Silu,
        layer_kinds: vec![AttentionKind::Full; layers],
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
    };

    let mut map: HashMap<String, Tensor> = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else {
            return err(format!("{what}: unexpected GGUF tensor `{name}`"));
        };
        if hf.is_empty() {
            continue;
        }
        let q = content
            .tensor(&mut file, name, device)
            .ctx(|| format!("{what}: tensor `{name}`"))?;
        let mut t = q
            .dequantize(device)
            .ctx(|| format!("{what}: dequantizing `{name}`"))?;
        // llama.cpp permutes q/k rows for its rope layout (llama only;
        // qwen2 GGUFs keep the HF layout).
        if arch != "qwen2" {
            if name.ends_with("attn_q.weight") {
                t = unpermute_qk(&t, heads)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute_qk(&t, kv_heads)?;
            } else if name.ends_with("attn_q.bias") || name.ends_with("attn_k.bias") {
                let n = if name.ends_with("attn_q.bias") {
                    heads
                } else {
                    kv_heads
                };
                let len = t.dims1().ctx(|| format!("{what}: `{name}`"))?;
                t = c(unpermute_qk(&c(t.reshape((len, 1)))?, n)?.reshape(len))?;
            }
        }
        map.insert(hf, t);
    }
    let model = Model::from_candle_tensors(config, map, device)
        .map_err(|e| crate::Error::Msg(format!("{what}: {e}")))?;
    let tokenizer = match &tokens {
        Some(tokens) => {
            let tok_json = tokenizer_json(&content, tokens)
                .map_err(|e| crate::Error::Msg(format!("{what}: {e}")))?;
            Some(TextTokenizer::from_json_bytes(
                tok_json.to_string().as_bytes(),
                &model.config,
                &what,
            )?)
        }
        None => None,
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// A tokenizer.json equivalent to transformers' GGUF conversion for
/// byte-level BPE (`tokenizer.ggml.model = gpt2`).
fn tokenizer_json(content: &Content, tokens: &[String]) -> Result<Value> {
    let model = meta(content, "tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if model != "gpt2" {
        return err(format!(
            "GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
        ));
    }
    let merges: Vec<String> = match meta(content, "tokenizer.ggml.merges") {
        Some(GValue::Array(a)) => a
            .iter()
            .map(|v| v.to_string().cloned().unwrap_or_default())
            .collect(),
        _ => return err("missing GGUF metadata `tokenizer.ggml.merges`"),
    };
    let types: Vec<u64> = match meta(content, "tokenizer.ggml.token_type") {
        Some(GValue::Array(a)) => a.iter().map(|v| as_u64(v).unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        // 3 = control (special), 4 = user-defined (added, not special)
        match types.get(i) {
            Some(3) => added.push(json!({"id": i, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})),
            Some(4) => added.push(json!({"id": i, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": false})),
            _ => {}
        }
    }
    let tok_id = |k: &str| meta(content, k).and_then(as_u64);
    let unk =
        tok_id("tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize).cloned());
    let add_bos = meta(content, "tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let post = match (add_bos, tok_id("tokenizer.ggml.bos_token_id")) {
        (true, Some(b)) => {
            let bos = tokens.get(b as usize).cloned().unwrap_or_default();
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [b], "tokens": [bos]}}})
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_roundtrip_and_layout() {
        let dev = Device::Cpu;
        // 2 heads × 4 rows, 1 column: HF rows h0:[0,1,2,3] h1:[4,5,6,7]
        let w = Tensor::arange(0f32, 8.0, &dev)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        // llama.cpp interleaves the two rotary halves within each head
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
        let back = unpermute_qk(&p, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..8).map(|x| x as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("mystery").is_none());
    }
}
