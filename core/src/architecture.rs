//! Architecture definitions: which tensors a model family has, as data
//! (`core/architectures/*.json`, one file per family, spec §6), plus inference
//! from tensor names for families without a file (§6.6).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct WeightInfo {
    pub name: String,
    #[serde(default)]
    pub is_embed: bool,
    #[serde(default)]
    pub optional: bool,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub tied_names: Vec<String>,
    #[serde(default)]
    pub force_dtype: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct LayerTemplates {
    pub weights: Vec<WeightInfo>,
}

/// One architecture family (a single-module definition).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Architecture {
    /// Definition file name (`llama.json`) or `inferred`.
    #[serde(default)]
    pub file: String,
    pub model_type: String,
    pub architectures: Vec<String>,
    #[serde(default)]
    pub num_layers_config_key: Option<String>,
    #[serde(default)]
    pub override_num_layers: Option<usize>,
    #[serde(default)]
    pub vocab_size_config_key: Option<String>,
    #[serde(default)]
    pub pre_weights: Vec<WeightInfo>,
    pub layer_templates: LayerTemplates,
    #[serde(default)]
    pub post_weights: Vec<WeightInfo>,
}

macro_rules! arch_files {
    ($($f:literal),* $(,)?) => {
        &[$(($f, include_str!(concat!("../architectures/", $f)))),*]
    };
}

const DEFINITIONS: &[(&str, &str)] = arch_files!(
    "baichuan.json",
    "cohere.json",
    "exaone.json",
    "falcon.json",
    "gemma.json",
    "gemma2.json",
    "gemma3.json",
    "gpt-neox.json",
    "gpt2.json",
    "granite.json",
    "internlm2.json",
    "llama.json",
    "mistral.json",
    "mixtral.json",
    "olmo2.json",
    "phi-1.json",
    "phi2-old.json",
    "phi2.json",
    "phi3.json",
    "qwen.json",
    "qwen2.json",
    "qwen3.json",
    "qwen3_moe.json",
    "solar.json",
    "stablelm.json",
    "stablelm2.json",
    "starcoder2.json",
);

/// Every bundled definition, parsed once.
pub fn definitions() -> &'static [Arc<Architecture>] {
    static DEFS: OnceLock<Vec<Arc<Architecture>>> = OnceLock::new();
    DEFS.get_or_init(|| {
        DEFINITIONS
            .iter()
            .map(|(file, text)| {
                let mut a: Architecture = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("bundled architecture {file} is invalid: {e}"));
                a.file = file.to_string();
                Arc::new(a)
            })
            .collect()
    })
}

/// Finds the definition for a model's config.json (spec §6.2). `Ok(None)`
/// means no bundled definition: the caller infers one from tensor names.
pub fn lookup(config: &Value, model: &str) -> Result<Option<Arc<Architecture>>> {
    let archs = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .ok_or_else(|| Error::format(format!("{model}/config.json"), "no `architectures` list"))?;
    if archs.len() != 1 {
        return Err(Error::format(
            format!("{model}/config.json"),
            format!(
                "expected exactly one entry in `architectures`, found {}",
                archs.len()
            ),
        ));
    }
    let name = archs[0].as_str().unwrap_or_default();
    let candidates: Vec<&Arc<Architecture>> = definitions()
        .iter()
        .filter(|a| a.architectures.iter().any(|n| n == name))
        .collect();
    let model_type = config.get("model_type").and_then(|v| v.as_str());
    Ok(match candidates.len() {
        0 => None,
        1 => Some(candidates[0].clone()),
        _ => candidates
            .iter()
            .find(|a| Some(a.model_type.as_str()) == model_type)
            .map(|a| (*a).clone()),
    })
}

/// Reads a dotted path (`text_config.num_hidden_layers`) from a config.
pub fn config_path<'a>(config: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = config;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    Some(v)
}

impl Architecture {
    /// Number of layers of a model with this config.
    pub fn num_layers(&self, config: &Value, model: &str) -> Result<usize> {
        if let Some(n) = self.override_num_layers {
            return Ok(n);
        }
        let key = self
            .num_layers_config_key
            .as_deref()
            .unwrap_or("num_hidden_layers");
        config_path(config, key)
            .and_then(|v| v.as_u64())
            .map(|n| n as usize)
            .ok_or_else(|| {
                Error::format(
                    format!("{model}/config.json"),
                    format!("missing or non-integer `{key}` (layer count)"),
                )
            })
    }

    pub fn vocab_size_key(&self) -> &str {
        self.vocab_size_config_key
            .as_deref()
            .unwrap_or("vocab_size")
    }

    pub fn pre_weights(&self, num_layers: usize) -> Vec<WeightInfo> {
        self.pre_weights
            .iter()
            .map(|w| substitute(w, None, num_layers))
            .collect()
    }

    pub fn layer_weights(&self, layer: usize, num_layers: usize) -> Vec<WeightInfo> {
        self.layer_templates
            .weights
            .iter()
            .map(|w| substitute(w, Some(layer), num_layers))
            .collect()
    }

    pub fn post_weights(&self, num_layers: usize) -> Vec<WeightInfo> {
        self.post_weights
            .iter()
            .map(|w| substitute(w, None, num_layers))
            .collect()
    }

    /// Infers an architecture from the tensor names of the input models
    /// (spec §6.6, without transformers' module metadata): names with a
    /// `.<digits>.` component are layer tensors; everything else is a
    /// pre-layer weight. A weight missing from any model is optional.
    pub fn infer(models: &[(String, BTreeSet<String>)]) -> Result<Architecture> {
        let mut prefixes: BTreeMap<String, usize> = BTreeMap::new();
        let mut templates: BTreeMap<String, (usize, usize)> = BTreeMap::new(); // template -> (present count, first seen)
        let mut loose: BTreeMap<String, usize> = BTreeMap::new();
        let mut order = 0usize;
        for (_, names) in models {
            for n in names {
                order += 1;
                match split_layer(n) {
                    Some((prefix, idx, template)) => {
                        let e = prefixes.entry(prefix).or_insert(0);
                        *e = (*e).max(idx + 1);
                        templates.entry(template).or_insert((0, order)).0 += 1;
                    }
                    None => *loose.entry(n.clone()).or_insert(0) += 1,
                }
            }
        }
        if prefixes.len() > 1 {
            return Err(Error::msg(format!(
                "cannot infer the architecture: tensors form {} layer stacks ({}); \
                 add a definition under core/architectures/",
                prefixes.len(),
                prefixes.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let num_layers = prefixes.values().next().copied().unwrap_or(0);
        let n_models = models.len();
        let expect = |count: usize, per: usize| count < n_models * per;
        let is_embed = |n: &str| {
            n.contains("embed_tokens") || n.contains("lm_head") || n.ends_with("wte.weight")
        };
        let weights = |names: Vec<(String, usize)>, per: usize| {
            names
                .into_iter()
                .map(|(n, c)| WeightInfo {
                    is_embed: is_embed(&n),
                    optional: expect(c, per) || n.contains("lm_head"),
                    name: n,
                    aliases: vec![],
                    tied_names: vec![],
                    force_dtype: None,
                })
                .collect::<Vec<_>>()
        };
        let pre = weights(loose.into_iter().collect(), 1);
        let layer = weights(
            templates.into_iter().map(|(t, (c, _))| (t, c)).collect(),
            num_layers.max(1),
        );
        Ok(Architecture {
            file: "inferred".into(),
            model_type: "inferred".into(),
            architectures: vec![],
            num_layers_config_key: None,
            override_num_layers: Some(num_layers),
            vocab_size_config_key: None,
            pre_weights: pre,
            layer_templates: LayerTemplates { weights: layer },
            post_weights: vec![],
        })
    }
}

/// `model.layers.7.mlp.up_proj.weight` → (`model.layers`, 7, `model.layers.${layer_index}.mlp.up_proj.weight`).
fn split_layer(name: &str) -> Option<(String, usize, String)> {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 1..parts.len().saturating_sub(1) {
        if !parts[i].is_empty() && parts[i].bytes().all(|b| b.is_ascii_digit()) {
            let idx: usize = parts[i].parse().ok()?;
            let prefix = parts[..i].join(".");
            let mut t = parts.clone();
            t[i] = "${layer_index}";
            return Some((prefix, idx, t.join(".")));
        }
    }
    None
}

fn subst_str(s: &str, layer: Option<usize>, num_layers: usize) -> String {
    if !s.contains('{') {
        return s.to_string();
    }
    let mut out = s.to_string();
    if let Some(l) = layer {
        out = out
            .replace("${layer_index+1}", &(l + 1).to_string())
            .replace("${layer_index-1}", &l.wrapping_sub(1).to_string())
            .replace("${layer_index}", &l.to_string());
    }
    out.replace("${num_layers+1}", &(num_layers + 1).to_string())
        .replace("${num_layers-1}", &num_layers.wrapping_sub(1).to_string())
        .replace("${num_layers}", &num_layers.to_string())
}

fn substitute(w: &WeightInfo, layer: Option<usize>, num_layers: usize) -> WeightInfo {
    WeightInfo {
        name: subst_str(&w.name, layer, num_layers),
        is_embed: w.is_embed,
        optional: w.optional,
        aliases: w
            .aliases
            .iter()
            .map(|a| subst_str(a, layer, num_layers))
            .collect(),
        tied_names: w
            .tied_names
            .iter()
            .map(|a| subst_str(a, layer, num_layers))
            .collect(),
        force_dtype: w.force_dtype.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_definitions_parse_and_llama_resolves() {
        assert!(definitions().len() >= 20);
        let cfg = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 3});
        let a = lookup(&cfg, "m").unwrap().unwrap();
        assert_eq!(a.file, "llama.json");
        assert_eq!(a.num_layers(&cfg, "m").unwrap(), 3);
        let l = a.layer_weights(2, 3);
        assert!(
            l.iter()
                .any(|w| w.name == "model.layers.2.self_attn.q_proj.weight")
        );
        let post = a.post_weights(3);
        let head = post.iter().find(|w| w.name == "lm_head.weight").unwrap();
        assert!(head.optional && head.is_embed);
        assert_eq!(
            head.tied_names,
            vec!["model.embed_tokens.weight".to_string()]
        );
    }

    #[test]
    fn phi_disambiguates_by_model_type() {
        let cfg =
            serde_json::json!({"architectures": ["PhiForCausalLM"], "model_type": "phi-msft"});
        assert_eq!(lookup(&cfg, "m").unwrap().unwrap().file, "phi2-old.json");
    }

    #[test]
    fn inference_from_names() {
        let names: BTreeSet<String> = ["emb.weight", "blocks.0.w", "blocks.1.w", "blocks.0.b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a = Architecture::infer(&[("m".into(), names)]).unwrap();
        assert_eq!(a.override_num_layers, Some(2));
        let l = a.layer_weights(1, 2);
        assert!(l.iter().any(|w| w.name == "blocks.1.w" && !w.optional));
        assert!(l.iter().any(|w| w.name == "blocks.1.b" && w.optional));
    }
}
