//! Per-token log-probabilities: `logprobs[i] = log p(tokens[i+1] | tokens[..=i])`,
//! computed for batches of right-padded sequences (causal attention makes the
//! padding invisible to real positions).

use std::path::Path;

use candle_core::Tensor;
use serde_json::{Value, json};

use crate::model::{LoadedModel, Model};
use crate::{Ctx, Result, c, err};

/// One line of an input file: token ids as given, or text to tokenize.
#[derive(Debug, Clone)]
pub enum LogprobInput {
    Tokens { id: Value, tokens: Vec<u32> },
    Text { id: Value, text: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogprobRow {
    pub id: Value,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
}

impl LogprobRow {
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "tokens": self.tokens, "logprobs": self.logprobs})
    }
}

/// How many (padded) tokens one forward pass may hold.
pub const DEFAULT_BATCH_TOKENS: usize = 4096;
/// Rows of logits materialised at once (`rows × vocab` floats).
const LOGIT_ROWS: usize = 512;

/// Reads `{"id", "tokens"}` / `{"id", "text"}` lines; errors name the line.
pub fn read_inputs(path: &Path) -> Result<Vec<LogprobInput>> {
    let text = std::fs::read_to_string(path).ctx(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| crate::Error::Msg(format!("{}: not JSON: {e}", at())))?;
        let id = v.get("id").cloned().unwrap_or(Value::Null);
        match (v.get("tokens"), v.get("text")) {
            (Some(Value::Array(a)), None) => {
                let mut tokens = Vec::with_capacity(a.len());
                for x in a {
                    match x.as_u64() {
                        Some(t) if t <= u32::MAX as u64 => tokens.push(t as u32),
                        _ => {
                            return err(format!(
                                "{}: `tokens` must hold non-negative integers, got {x}",
                                at()
                            ));
                        }
                    }
                }
                out.push(LogprobInput::Tokens { id, tokens });
            }
            (None, Some(Value::String(s))) => out.push(LogprobInput::Text {
                id,
                text: s.clone(),
            }),
            (Some(_), Some(_)) => {
                return err(format!(
                    "{}: give either `tokens` or `text`, not both",
                    at()
                ));
            }
            _ => {
                return err(format!(
                    "{}: expected {{\"id\", \"tokens\": [int]}} or {{\"id\", \"text\": str}}",
                    at()
                ));
            }
        }
    }
    Ok(out)
}

/// Log-probabilities of every token after the first, for each sequence.
pub fn sequence_logprobs(model: &Model, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    sequence_logprobs_with(model, seqs, DEFAULT_BATCH_TOKENS)
}

/// As [`sequence_logprobs`], with a padded-token budget per forward pass.
pub fn sequence_logprobs_with(
    model: &Model,
    seqs: &[Vec<u32>],
    batch_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let vocab = model.vocab_size() as u32;
    for (i, s) in seqs.iter().enumerate() {
        if let Some(bad) = s.iter().find(|&&t| t >= vocab) {
            return err(format!(
                "sequence {i}: token id {bad} is out of range for vocab_size {vocab}"
            ));
        }
    }
    let mut out: Vec<Vec<f32>> = vec![vec![]; seqs.len()];
    // Longest first, so that each batch pads little.
    let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].len() >= 2).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut start = 0;
    while start < order.len() {
        let tmax = seqs[order[start]].len();
        let per = (batch_tokens / tmax).max(1);
        let end = (start + per).min(order.len());
        let batch = &order[start..end];
        let rows = batch_logprobs(model, seqs, batch, tmax)?;
        for (&i, r) in batch.iter().zip(rows) {
            out[i] = r;
        }
        start = end;
    }
    Ok(out)
}

fn batch_logprobs(
    model: &Model,
    seqs: &[Vec<u32>],
    batch: &[usize],
    t: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut pos = Vec::with_capacity(batch.len());
    let mut rows = Vec::new(); // flat hidden rows to score
    let mut targets = Vec::new();
    for (bi, &i) in batch.iter().enumerate() {
        let s = &seqs[i];
        let mut row = s.clone();
        row.resize(t, 0);
        ids.push(row);
        pos.push((0..t as i64).collect::<Vec<_>>());
        for j in 0..s.len() - 1 {
            rows.push((bi * t + j) as u32);
            targets.push(s[j + 1]);
        }
    }
    let hidden = model.forward(&ids, &pos, None)?;
    let h = model.config.hidden_size;
    let hidden = c(hidden.reshape((batch.len() * t, h)))?;
    let lp = gather_logprobs(model, &hidden, &rows, &targets)?;
    let mut out = Vec::with_capacity(batch.len());
    let mut k = 0;
    for &i in batch {
        let n = seqs[i].len() - 1;
        out.push(lp[k..k + n].to_vec());
        k += n;
    }
    Ok(out)
}

/// `log p(targets[k] | hidden[rows[k]])` for every k, in chunks of rows.
pub(crate) fn gather_logprobs(
    model: &Model,
    hidden: &Tensor,
    rows: &[u32],
    targets: &[u32],
) -> Result<Vec<f32>> {
    let dev = model.device();
    let mut out = Vec::with_capacity(rows.len());
    for (r, tg) in rows.chunks(LOGIT_ROWS).zip(targets.chunks(LOGIT_ROWS)) {
        let idx = c(Tensor::from_vec(r.to_vec(), r.len(), dev))?;
        let hs = c(hidden.index_select(&idx, 0))?;
        out.extend(model.pick_log_probs(&hs, tg)?);
    }
    Ok(out)
}

/// Tokenizes (text lines) and scores every input, in input order.
pub fn logprobs(loaded: &LoadedModel, inputs: &[LogprobInput]) -> Result<Vec<LogprobRow>> {
    let mut seqs = Vec::with_capacity(inputs.len());
    let mut ids = Vec::with_capacity(inputs.len());
    for inp in inputs {
        match inp {
            LogprobInput::Tokens { id, tokens } => {
                ids.push(id.clone());
                seqs.push(tokens.clone());
            }
            LogprobInput::Text { id, text } => {
                let Some(tok) = &loaded.tokenizer else {
                    return err(format!(
                        "input {id}: text given but {} has no tokenizer.json",
                        loaded.path.display()
                    ));
                };
                ids.push(id.clone());
                seqs.push(tok.encode(text)?);
            }
        }
    }
    let vocab = loaded.model.vocab_size() as u32;
    for (id, s) in ids.iter().zip(&seqs) {
        if let Some(bad) = s.iter().find(|&&t| t >= vocab) {
            return err(format!(
                "input {id}: token id {bad} is out of range for vocab_size {vocab}"
            ));
        }
    }
    let lps = sequence_logprobs(&loaded.model, &seqs)?;
    Ok(ids
        .into_iter()
        .zip(seqs)
        .zip(lps)
        .map(|((id, tokens), logprobs)| LogprobRow {
            id,
            tokens,
            logprobs,
        })
        .collect())
}
