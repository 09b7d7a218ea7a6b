//! The decoder's hyper-parameters, read from a Hugging Face `config.json` in
//! either the transformers-5 form (`rope_parameters`) or the older one
//! (`rope_theta` + `rope_scaling`), or built from GGUF metadata.

use serde_json::Value;

use crate::{Result, err};

/// How rotary position embeddings are scaled (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware base growth once the sequence exceeds `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    /// Llama 3.1's frequency-band rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (ramped interpolation plus an attention factor on cos/sin).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

/// Per-layer attention kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionKind {
    Full,
    /// Position `q` sees keys `k` with `q - k < window` (transformers 5).
    Sliding(usize),
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Fraction of each head's dimensions that are rotated.
    pub partial_rotary_factor: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub hidden_act: Activation,
    pub layer_kinds: Vec<AttentionKind>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    GeluTanh,
    Gelu,
}

/// Model families whose decoder is exactly the generic one implemented here.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

fn get_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) => Ok(Some(n as usize)),
            None => err(format!(
                "config.json: field `{key}` must be a non-negative integer, got {x}"
            )),
        },
    }
}

fn req_usize(v: &Value, key: &str) -> Result<usize> {
    match get_usize(v, key)? {
        Some(0) => err(format!("config.json: field `{key}` must be positive")),
        Some(n) => Ok(n),
        None => err(format!("config.json: missing field `{key}`")),
    }
}

fn get_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_f64() {
            Some(f) if f.is_finite() => Ok(Some(f)),
            _ => err(format!(
                "config.json: field `{key}` must be a finite number, got {x}"
            )),
        },
    }
}

fn token_ids(v: Option<&Value>, key: &str) -> Result<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(i) => Ok(vec![i as u32]),
            None => err(format!("config.json: `{key}` must be a token id, got {n}")),
        },
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64().map(|i| i as u32).ok_or_else(|| {
                    crate::Error::Msg(format!("config.json: `{key}` must hold token ids, got {x}"))
                })
            })
            .collect(),
        Some(other) => err(format!(
            "config.json: `{key}` must be a token id or a list, got {other}"
        )),
    }
}

/// Parses the rope block: `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (older), which may also be mixed.
fn parse_rope(v: &Value, max_pos: usize) -> Result<(f64, RopeScaling, f64)> {
    let params = match v.get("rope_parameters") {
        Some(Value::Object(_)) => v.get("rope_parameters"),
        Some(Value::Null) | None => None,
        Some(other) => {
            return err(format!(
                "config.json: `rope_parameters` must be an object, got {other}"
            ));
        }
    };
    let scaling = match v.get("rope_scaling") {
        Some(Value::Object(_)) => v.get("rope_scaling"),
        Some(Value::Null) | None => None,
        Some(other) => {
            return err(format!(
                "config.json: `rope_scaling` must be an object or null, got {other}"
            ));
        }
    };
    // Where to look for each field: rope_parameters first, then rope_scaling,
    // then the top level (rope_theta, partial_rotary_factor).
    let look = |key: &str| -> Result<Option<f64>> {
        for src in [params, scaling].into_iter().flatten() {
            if let Some(x) = get_f64(src, key)? {
                return Ok(Some(x));
            }
        }
        Ok(None)
    };
    let theta = match look("rope_theta")? {
        Some(t) => t,
        None => get_f64(v, "rope_theta")?.unwrap_or(10000.0),
    };
    let partial = match look("partial_rotary_factor")? {
        Some(p) => p,
        None => get_f64(v, "partial_rotary_factor")?.unwrap_or(1.0),
    };
    if theta <= 0.0 {
        return err(format!(
            "config.json: rope_theta must be positive, got {theta}"
        ));
    }
    if !(partial > 0.0 && partial <= 1.0) {
        return err(format!(
            "config.json: partial_rotary_factor must be in (0, 1], got {partial}"
        ));
    }
    let mut kind = None;
    for src in [params, scaling].into_iter().flatten() {
        for key in ["rope_type", "type"] {
            if let Some(t) = src.get(key).and_then(Value::as_str) {
                kind.get_or_insert_with(|| t.to_string());
            }
        }
    }
    let kind = kind.unwrap_or_else(|| "default".into());
    let factor = || -> Result<f64> {
        match look("factor")? {
            Some(f) if f > 0.0 => Ok(f),
            Some(f) => err(format!(
                "config.json: rope factor must be positive, got {f}"
            )),
            None => err(format!(
                "config.json: rope_type `{kind}` needs a `factor`",
                kind = kind
            )),
        }
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => {
            let need = |k: &str| -> Result<f64> {
                look(k)?.ok_or_else(|| {
                    crate::Error::Msg(format!("config.json: rope_type `llama3` needs `{k}`"))
                })
            };
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            }
        }
        "yarn" => {
            let mut f = factor()?;
            let orig = look("original_max_position_embeddings")?;
            // transformers: with an explicit original length, the factor is
            // implied by max_position_embeddings / original.
            let original = match orig {
                Some(o) => {
                    if max_pos > 0 && o > 0.0 {
                        f = max_pos as f64 / o;
                    }
                    o
                }
                None => max_pos as f64,
            };
            let truncate = [params, scaling]
                .into_iter()
                .flatten()
                .find_map(|s| s.get("truncate").and_then(Value::as_bool))
                .unwrap_or(true);
            RopeScaling::Yarn {
                factor: f,
                original_max_position_embeddings: original,
                beta_fast: look("beta_fast")?.unwrap_or(32.0),
                beta_slow: look("beta_slow")?.unwrap_or(1.0),
                attention_factor: look("attention_factor")?,
                mscale: look("mscale")?,
                mscale_all_dim: look("mscale_all_dim")?,
                truncate,
            }
        }
        other => {
            return err(format!(
                "config.json: rope_type `{other}` is not supported (supported: default, linear, dynamic, llama3, yarn)"
            ));
        }
    };
    Ok((theta, scaling, partial))
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` value.
    pub fn from_json(v: &Value) -> Result<ModelConfig> {
        if !v.is_object() {
            return err("config.json: expected a JSON object");
        }
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let arch = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("");
        let model_type = if model_type.is_empty() {
            match arch {
                "LlamaForCausalLM" => "llama".to_string(),
                "MistralForCausalLM" => "mistral".to_string(),
                "Qwen2ForCausalLM" => "qwen2".to_string(),
                "Qwen3ForCausalLM" => "qwen3".to_string(),
                _ => {
                    return err(format!(
                        "config.json: no `model_type` and unknown architecture `{arch}`"
                    ));
                }
            }
        } else {
            model_type
        };
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return err(format!(
                "config.json: model_type `{model_type}` is not supported by smelt eval (supported: {})",
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
        let hidden_size = req_usize(v, "hidden_size")?;
        let num_attention_heads = req_usize(v, "num_attention_heads")?;
        let num_key_value_heads =
            get_usize(v, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return err(format!(
                "config.json: num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let head_dim = match get_usize(v, "head_dim")? {
            Some(d) if d > 0 => d,
            _ => {
                if hidden_size % num_attention_heads != 0 {
                    return err(format!(
                        "config.json: hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads} and no head_dim is given"
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let num_hidden_layers = req_usize(v, "num_hidden_layers")?;
        let max_position_embeddings = get_usize(v, "max_position_embeddings")?.unwrap_or(0);
        let (rope_theta, rope_scaling, partial_rotary_factor) =
            parse_rope(v, max_position_embeddings)?;
        let rot = (head_dim as f64 * partial_rotary_factor) as usize;
        if rot == 0 || !rot.is_multiple_of(2) {
            return err(format!(
                "config.json: rotary dimension {rot} (head_dim × partial_rotary_factor) must be even and positive"
            ));
        }
        let hidden_act = match v
            .get("hidden_act")
            .or_else(|| v.get("hidden_activation"))
            .and_then(Value::as_str)
            .unwrap_or("silu")
        {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return err(format!(
                    "config.json: hidden_act `{other}` is not supported (silu, gelu, gelu_pytorch_tanh)"
                ));
            }
        };
        let layer_kinds = layer_kinds(v, &model_type, num_hidden_layers)?;
        let tie_word_embeddings = v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(ModelConfig {
            model_type,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: req_usize(v, "vocab_size")?,
            rms_norm_eps: get_f64(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            partial_rotary_factor,
            max_position_embeddings,
            tie_word_embeddings,
            hidden_act,
            layer_kinds,
            bos_token_id: token_ids(v.get("bos_token_id"), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(v.get("eos_token_id"), "eos_token_id")?,
        })
    }

    /// Dimensions of each head that are rotated.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }
}

/// Which layers use sliding-window attention, following transformers 5:
/// an explicit `layer_types` list wins; mistral slides every layer when
/// `sliding_window` is set; qwen2/qwen3 slide layers `>= max_window_layers`
/// when `use_sliding_window` is true.
fn layer_kinds(v: &Value, model_type: &str, n: usize) -> Result<Vec<AttentionKind>> {
    let window = get_usize(v, "sliding_window")?;
    let use_sw = v
        .get("use_sliding_window")
        .and_then(Value::as_bool)
        .unwrap_or(model_type == "mistral");
    let window = if use_sw { window } else { None };
    let sliding = |w: Option<usize>| -> Result<AttentionKind> {
        match w {
            Some(0) => err("config.json: sliding_window must be positive"),
            Some(w) => Ok(AttentionKind::Sliding(w)),
            None => {
                err("config.json: layer_types names sliding_attention but sliding_window is null")
            }
        }
    };
    if let Some(Value::Array(types)) = v.get("layer_types") {
        if types.len() != n {
            return err(format!(
                "config.json: layer_types has {} entries for {n} layers",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(AttentionKind::Full),
                Some("sliding_attention") => sliding(window.or(get_usize(v, "sliding_window")?)),
                _ => err(format!("config.json: unknown layer type {t}")),
            })
            .collect();
    }
    match (model_type, window) {
        (_, None) => Ok(vec![AttentionKind::Full; n]),
        ("qwen2" | "qwen3", Some(w)) => {
            let from = get_usize(v, "max_window_layers")?.unwrap_or(n);
            (0..n)
                .map(|i| {
                    if i >= from {
                        sliding(Some(w))
                    } else {
                        Ok(AttentionKind::Full)
                    }
                })
                .collect()
        }
        (_, Some(w)) => (0..n).map(|_| sliding(Some(w))).collect(),
    }
}

/// The rotary inverse frequencies and the cos/sin multiplier for a sequence
/// of length `seq_len` (only dynamic scaling depends on it), computed as
/// transformers does (float32 frequencies).
pub fn rope_frequencies(cfg: &ModelConfig, seq_len: usize) -> (Vec<f32>, f32) {
    let dim = cfg.rotary_dim();
    let base = cfg.rope_theta;
    let default_inv = |base: f64| -> Vec<f32> {
        (0..dim)
            .step_by(2)
            .map(|i| {
                // torch: 1.0 / (base ** (arange(0, dim, 2).float() / dim)) in f32
                let e = (i as f32 / dim as f32) as f64;
                let p = base.powf(e) as f32;
                1.0f32 / p
            })
            .collect()
    };
    match &cfg.rope_scaling {
        RopeScaling::Default => (default_inv(base), 1.0),
        RopeScaling::Linear { factor } => (
            default_inv(base)
                .into_iter()
                .map(|f| f / *factor as f32)
                .collect(),
            1.0,
        ),
        RopeScaling::Dynamic { factor } => {
            let max = cfg.max_position_embeddings as f64;
            let len = seq_len as f64;
            if len > max && max > 0.0 {
                let b = base
                    * ((factor * len / max) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0));
                (default_inv(b), 1.0)
            } else {
                (default_inv(base), 1.0)
            }
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let inv = default_inv(base)
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                    let f = f as f64;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    if wavelen < high_wavelen || wavelen > low_wavelen {
                        scaled as f32
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    }
                })
                .collect();
            (inv, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: orig,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let att = match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => *a,
                (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                    get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                }
                _ => get_mscale(*factor, 1.0),
            };
            let d = dim as f64;
            let corr_dim = |rot: f64| {
                (d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
            };
            let (mut low, mut high) = (corr_dim(*beta_fast), corr_dim(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let high = high.min(d - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            let inv: Vec<f32> = (0..dim / 2)
                .map(|j| {
                    let pos_freq = base.powf((2 * j) as f32 as f64 / d) as f32;
                    let extra = 1.0 / pos_freq;
                    let inter = 1.0 / (*factor as f32 * pos_freq);
                    let ramp =
                        ((j as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                    let extra_factor = 1.0 - ramp;
                    inter * (1.0 - extra_factor) + extra * extra_factor
                })
                .collect();
            (inv, att as f32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 256})
    }

    #[test]
    fn old_and_new_rope_forms_agree() {
        let mut old = base();
        old["rope_theta"] = json!(500000.0);
        old["rope_scaling"] = json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut new = base();
        new["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let a = ModelConfig::from_json(&old).unwrap();
        let b = ModelConfig::from_json(&new).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert!(matches!(
            a.rope_scaling,
            RopeScaling::Llama3 { factor: 8.0, .. }
        ));
        assert_eq!(rope_frequencies(&a, 10).0, rope_frequencies(&b, 10).0);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut c = base();
        c["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let cfg = ModelConfig::from_json(&c).unwrap();
        let (scaled, _) = rope_frequencies(&cfg, 1);
        let mut plain_cfg = cfg.clone();
        plain_cfg.rope_scaling = RopeScaling::Default;
        let (plain, _) = rope_frequencies(&plain_cfg, 1);
        // highest frequency: wavelength 2π < 64/4 → unchanged
        assert_eq!(scaled[0], plain[0]);
        // lowest: wavelength 2π·10000^(14/16) > 64 → divided by 8
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-9);
    }

    #[test]
    fn sliding_window_layers() {
        let mut m = base();
        m["model_type"] = json!("mistral");
        m["sliding_window"] = json!(4);
        let cfg = ModelConfig::from_json(&m).unwrap();
        assert_eq!(cfg.layer_kinds, vec![AttentionKind::Sliding(4); 2]);
        let mut q = base();
        q["model_type"] = json!("qwen2");
        q["sliding_window"] = json!(4);
        q["use_sliding_window"] = json!(false);
        assert_eq!(
            ModelConfig::from_json(&q).unwrap().layer_kinds,
            vec![AttentionKind::Full; 2]
        );
        q["use_sliding_window"] = json!(true);
        q["max_window_layers"] = json!(1);
        assert_eq!(
            ModelConfig::from_json(&q).unwrap().layer_kinds,
            vec![AttentionKind::Full, AttentionKind::Sliding(4)]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = base();
        c["num_key_value_heads"] = json!(3);
        let e = ModelConfig::from_json(&c).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut c = base();
        c["model_type"] = json!("gemma");
        let e = ModelConfig::from_json(&c).unwrap_err().to_string();
        assert!(e.contains("gemma"), "{e}");
        let mut c = base();
        c.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(&c).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }
}
