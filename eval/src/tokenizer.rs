//! Text ↔ token ids with the `tokenizers` crate, as transformers does:
//! `encode(text, add_special_tokens = true)` applies the post-processor
//! (BOS/EOS templates) and nothing else.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::{Result, err};

pub struct TextTokenizer {
    inner: Tokenizer,
    /// Token ids that end generation.
    pub eos_ids: BTreeSet<u32>,
    pub bos_id: Option<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; EOS ids come from config.json and from
    /// `tokenizer_config.json`'s `eos_token` beside it.
    pub fn from_file(path: &Path, cfg: &ModelConfig) -> Result<TextTokenizer> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| crate::Error::Msg(format!("{}: {e}", path.display())))?;
        let mut tok = TextTokenizer::new(inner, cfg);
        let tc = path.with_file_name("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&tc) {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| crate::Error::Msg(format!("{}: {e}", tc.display())))?;
            let name = |key: &str| -> Option<String> {
                match v.get(key) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Object(o)) => {
                        o.get("content").and_then(Value::as_str).map(String::from)
                    }
                    _ => None,
                }
            };
            if let Some(id) = name("eos_token").and_then(|s| tok.inner.token_to_id(&s)) {
                tok.eos_ids.insert(id);
            }
            if tok.bos_id.is_none() {
                tok.bos_id = name("bos_token").and_then(|s| tok.inner.token_to_id(&s));
            }
        }
        Ok(tok)
    }

    pub fn new(inner: Tokenizer, cfg: &ModelConfig) -> TextTokenizer {
        TextTokenizer {
            inner,
            eos_ids: cfg.eos_token_ids.iter().copied().collect(),
            bos_id: cfg.bos_token_id,
        }
    }

    /// Builds from tokenizer.json bytes (e.g. generated from GGUF metadata).
    pub fn from_json_bytes(bytes: &[u8], cfg: &ModelConfig, what: &str) -> Result<TextTokenizer> {
        let inner = Tokenizer::from_bytes(bytes)
            .map_err(|e| crate::Error::Msg(format!("{what}: tokenizer: {e}")))?;
        Ok(TextTokenizer::new(inner, cfg))
    }

    /// Token ids of `text`, special tokens as the post-processor adds them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self.inner.encode(text, true) {
            Ok(e) => Ok(e.get_ids().to_vec()),
            Err(e) => err(format!("tokenizing {:?}: {e}", truncate(text))),
        }
    }

    /// Token ids of `text` without any special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        match self.inner.encode(text, false) {
            Ok(e) => Ok(e.get_ids().to_vec()),
            Err(e) => err(format!("tokenizing {:?}: {e}", truncate(text))),
        }
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| crate::Error::Msg(format!("decoding tokens: {e}")))
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}
