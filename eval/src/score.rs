//! Task scoring. The kind of a task file follows its lines' fields:
//! - `{"text"}` → `mean_logprob`, `perplexity`, `tokens` (pooled over every
//!   scored token: each token after the first of its line);
//! - `{"context", "choices", "answer"}` → `acc`, `acc_norm` (lm-eval's
//!   convention: continuation = tokens of context+choice after the context's
//!   tokens; acc_norm divides by the choice's length in UTF-8 bytes);
//! - `{"prompt", "answer", "max_new_tokens"}` → `exact_match` (greedy
//!   decoding until EOS, a newline or max_new_tokens; whitespace-trimmed).

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::generate::{DEFAULT_GEN_BATCH, greedy};
use crate::logprobs::{DEFAULT_BATCH_TOKENS, sequence_logprobs_with};
use crate::model::{LoadedModel, Model};
use crate::tokenizer::TextTokenizer;
use crate::{Ctx, Result, err};

#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceItem {
    pub context: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenItem {
    pub prompt: String,
    pub answer: String,
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    Text(Vec<String>),
    Choice(Vec<ChoiceItem>),
    Generate(Vec<GenItem>),
}

impl Task {
    pub fn kind(&self) -> &'static str {
        match self {
            Task::Text(_) => "text",
            Task::Choice(_) => "multiple choice",
            Task::Generate(_) => "generation",
        }
    }

    /// Parses a task file; every problem names the file and line.
    pub fn read(path: &Path) -> Result<Task> {
        let text = std::fs::read_to_string(path).ctx(|| format!("{}", path.display()))?;
        Task::parse(&text).map_err(|e| crate::Error::Msg(format!("{}:{e}", path.display())))
    }

    /// Parses JSONL task text; errors start with the line number.
    pub fn parse(text: &str) -> Result<Task> {
        let mut task: Option<Task> = None;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let ln = n + 1;
            let v: Value = serde_json::from_str(line)
                .map_err(|e| crate::Error::Msg(format!("{ln}: not JSON: {e}")))?;
            let Some(o) = v.as_object() else {
                return err(format!("{ln}: expected a JSON object"));
            };
            let s = |k: &str| -> Result<String> {
                match o.get(k) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => err(format!("{ln}: `{k}` must be a string, got {other}")),
                    None => err(format!("{ln}: missing `{k}`")),
                }
            };
            let item = if o.contains_key("choices") || o.contains_key("context") {
                let choices = match o.get("choices") {
                    Some(Value::Array(a)) if !a.is_empty() => a
                        .iter()
                        .map(|c| {
                            c.as_str().map(String::from).ok_or_else(|| {
                                crate::Error::Msg(format!("{ln}: choices must be strings, got {c}"))
                            })
                        })
                        .collect::<Result<Vec<_>>>()?,
                    _ => {
                        return err(format!(
                            "{ln}: `choices` must be a non-empty list of strings"
                        ));
                    }
                };
                let answer = match o.get("answer").and_then(Value::as_u64) {
                    Some(a) if (a as usize) < choices.len() => a as usize,
                    _ => {
                        return err(format!(
                            "{ln}: `answer` must be an index into the {} choices, got {}",
                            choices.len(),
                            o.get("answer").map_or("nothing".into(), |a| a.to_string())
                        ));
                    }
                };
                Task::Choice(vec![ChoiceItem {
                    context: s("context")?,
                    choices,
                    answer,
                }])
            } else if o.contains_key("prompt") {
                let max_new_tokens = match o.get("max_new_tokens").and_then(Value::as_u64) {
                    Some(m) => m as usize,
                    None => {
                        return err(format!(
                            "{ln}: `max_new_tokens` must be a non-negative integer"
                        ));
                    }
                };
                Task::Generate(vec![GenItem {
                    prompt: s("prompt")?,
                    answer: s("answer")?,
                    max_new_tokens,
                }])
            } else if o.contains_key("text") {
                Task::Text(vec![s("text")?])
            } else {
                return err(format!(
                    "{ln}: unknown task line: expected `text`, `context`+`choices`+`answer` or `prompt`+`answer`+`max_new_tokens`"
                ));
            };
            task = Some(match (task, item) {
                (None, item) => item,
                (Some(Task::Text(mut a)), Task::Text(b)) => {
                    a.extend(b);
                    Task::Text(a)
                }
                (Some(Task::Choice(mut a)), Task::Choice(b)) => {
                    a.extend(b);
                    Task::Choice(a)
                }
                (Some(Task::Generate(mut a)), Task::Generate(b)) => {
                    a.extend(b);
                    Task::Generate(a)
                }
                (Some(t), item) => {
                    return err(format!(
                        "{ln}: a {} line in a {} task (one kind per file)",
                        item.kind(),
                        t.kind()
                    ));
                }
            });
        }
        task.ok_or_else(|| crate::Error::Msg("0: no task lines".into()))
    }
}

/// Metric name → value, in a fixed order.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics(pub Vec<(String, f64)>);

impl Metrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in &self.0 {
            // Counts print as integers.
            if k == "tokens" || k == "examples" {
                m.insert(k.clone(), json!(*v as u64));
            } else {
                m.insert(k.clone(), json!(v));
            }
        }
        Value::Object(m)
    }
}

/// Scoring knobs (batch sizes).
#[derive(Debug, Clone, Copy)]
pub struct ScoreOptions {
    /// Padded tokens per forward pass for log-likelihood tasks.
    pub batch_tokens: usize,
    /// Prompts decoded together.
    pub gen_batch: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            batch_tokens: DEFAULT_BATCH_TOKENS,
            gen_batch: DEFAULT_GEN_BATCH,
        }
    }
}

/// Scores a task file with a loaded model.
pub fn score_file(loaded: &LoadedModel, path: &Path, opts: &ScoreOptions) -> Result<Metrics> {
    let task = Task::read(path)?;
    let Some(tok) = &loaded.tokenizer else {
        return err(format!(
            "{}: no tokenizer.json, needed to score {}",
            loaded.path.display(),
            path.display()
        ));
    };
    score_task(&loaded.model, tok, &task, opts)
}

/// Scores a parsed task (the library entry point evolve uses with
/// [`Model::from_tensors`]).
pub fn score_task(
    model: &Model,
    tok: &TextTokenizer,
    task: &Task,
    opts: &ScoreOptions,
) -> Result<Metrics> {
    match task {
        Task::Text(lines) => score_text(model, tok, lines, opts),
        Task::Choice(items) => score_choice(model, tok, items, opts),
        Task::Generate(items) => score_generate(model, tok, items, opts),
    }
}

fn score_text(
    model: &Model,
    tok: &TextTokenizer,
    lines: &[String],
    opts: &ScoreOptions,
) -> Result<Metrics> {
    let seqs = lines
        .iter()
        .map(|l| tok.encode(l))
        .collect::<Result<Vec<_>>>()?;
    let lps = sequence_logprobs_with(model, &seqs, opts.batch_tokens)?;
    let mut sum = 0f64;
    let mut n = 0usize;
    for lp in &lps {
        for &x in lp {
            sum += x as f64;
            n += 1;
        }
    }
    if n == 0 {
        return err("text task: no scored tokens (every line has fewer than 2 tokens)");
    }
    let mean = sum / n as f64;
    Ok(Metrics(vec![
        ("mean_logprob".into(), mean),
        ("perplexity".into(), (-mean).exp()),
        ("tokens".into(), n as f64),
    ]))
}

/// lm-eval's `_encode_pair`: trailing spaces of the context move to the
/// continuation; the continuation is the tokens of context+continuation
/// after the context's tokens. Returns (whole sequence, continuation length).
pub fn encode_pair(
    tok: &TextTokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, usize)> {
    let trimmed = context.trim_end();
    let n_spaces = context.len() - trimmed.len();
    let (ctx, cont) = if n_spaces > 0 {
        (
            trimmed.to_string(),
            format!("{}{continuation}", &context[trimmed.len()..]),
        )
    } else {
        (context.to_string(), continuation.to_string())
    };
    let whole = tok.encode(&format!("{ctx}{cont}"))?;
    let mut ctx_enc = tok.encode(&ctx)?;
    if ctx_enc.is_empty() {
        // lm-eval conditions an empty context on the end-of-text token.
        match tok.bos_id.or_else(|| tok.eos_ids.iter().next().copied()) {
            Some(id) => ctx_enc = vec![id],
            None => return err("empty context and the tokenizer has no BOS/EOS token"),
        }
        let n = whole.len();
        let mut seq = ctx_enc;
        seq.extend_from_slice(&whole);
        return Ok((seq, n));
    }
    let n = whole.len().saturating_sub(ctx_enc.len());
    let mut seq = ctx_enc.clone();
    seq.extend_from_slice(&whole[ctx_enc.len().min(whole.len())..]);
    Ok((seq, n))
}

fn score_choice(
    model: &Model,
    tok: &TextTokenizer,
    items: &[ChoiceItem],
    opts: &ScoreOptions,
) -> Result<Metrics> {
    let mut seqs = Vec::new();
    let mut conts = Vec::new();
    for (k, it) in items.iter().enumerate() {
        for (j, ch) in it.choices.iter().enumerate() {
            let (seq, n) = encode_pair(tok, &it.context, ch)?;
            if n == 0 {
                return err(format!(
                    "example {}: choice {j} ({ch:?}) adds no tokens to the context",
                    k + 1
                ));
            }
            seqs.push(seq);
            conts.push(n);
        }
    }
    let lps = sequence_logprobs_with(model, &seqs, opts.batch_tokens)?;
    let mut k = 0;
    let (mut acc, mut acc_norm) = (0usize, 0usize);
    for it in items {
        let mut ll = Vec::with_capacity(it.choices.len());
        for _ in &it.choices {
            let lp = &lps[k];
            let n = conts[k];
            ll.push(lp[lp.len() - n..].iter().map(|&x| x as f64).sum::<f64>());
            k += 1;
        }
        let norm: Vec<f64> = ll
            .iter()
            .zip(&it.choices)
            .map(|(l, c)| l / (c.len().max(1) as f64))
            .collect();
        if argmax(&ll) == it.answer {
            acc += 1;
        }
        if argmax(&norm) == it.answer {
            acc_norm += 1;
        }
    }
    let n = items.len() as f64;
    Ok(Metrics(vec![
        ("acc".into(), acc as f64 / n),
        ("acc_norm".into(), acc_norm as f64 / n),
        ("examples".into(), n),
    ]))
}

/// Index of the first maximum (numpy's argmax).
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Greedy continuations of prompts, cut at the first newline.
pub fn generate_answers(
    model: &Model,
    tok: &TextTokenizer,
    prompts: &[String],
    max_new: &[usize],
    gen_batch: usize,
) -> Result<Vec<String>> {
    let enc = prompts
        .iter()
        .map(|p| {
            let mut e = tok.encode(p)?;
            if e.is_empty()
                && let Some(b) = tok.bos_id
            {
                e.push(b);
            }
            Ok(e)
        })
        .collect::<Result<Vec<_>>>()?;
    let stop = |_i: usize, g: &[u32]| tok.decode(g).map(|s| s.contains('\n')).unwrap_or(false);
    let gens = greedy(model, &enc, max_new, &tok.eos_ids, gen_batch, &stop)?;
    gens.iter()
        .map(|g| {
            let s = tok.decode(g)?;
            Ok(s.split('\n').next().unwrap_or("").to_string())
        })
        .collect()
}

fn score_generate(
    model: &Model,
    tok: &TextTokenizer,
    items: &[GenItem],
    opts: &ScoreOptions,
) -> Result<Metrics> {
    let prompts: Vec<String> = items.iter().map(|i| i.prompt.clone()).collect();
    let max_new: Vec<usize> = items.iter().map(|i| i.max_new_tokens).collect();
    let answers = generate_answers(model, tok, &prompts, &max_new, opts.gen_batch)?;
    let hits = items
        .iter()
        .zip(&answers)
        .filter(|(it, a)| a.trim() == it.answer.trim())
        .count();
    let n = items.len() as f64;
    Ok(Metrics(vec![
        ("exact_match".into(), hits as f64 / n),
        ("examples".into(), n),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_fields() {
        assert!(
            matches!(Task::parse("{\"text\":\"a b\"}\n").unwrap(), Task::Text(v) if v.len() == 1)
        );
        let t = Task::parse("{\"context\":\"q\",\"choices\":[\"a\",\"b\"],\"answer\":1}").unwrap();
        assert_eq!(
            t,
            Task::Choice(vec![ChoiceItem {
                context: "q".into(),
                choices: vec!["a".into(), "b".into()],
                answer: 1
            }])
        );
        let t = Task::parse("{\"prompt\":\"1+1=\",\"answer\":\"2\",\"max_new_tokens\":3}").unwrap();
        assert!(matches!(t, Task::Generate(v) if v[0].max_new_tokens == 3));
    }

    #[test]
    fn bad_lines_are_named() {
        let e = Task::parse(
            "{\"text\":\"a\"}\n{\"prompt\":\"x\",\"answer\":\"y\",\"max_new_tokens\":1}",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("2: ") && e.contains("one kind per file"),
            "{e}"
        );
        let e = Task::parse("{\"context\":\"q\",\"choices\":[\"a\"],\"answer\":3}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("answer"), "{e}");
        let e = Task::parse("{\"prompt\":\"q\",\"answer\":\"a\"}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_new_tokens"), "{e}");
        let e = Task::parse("nope").unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
        assert!(Task::parse("\n\n").is_err());
    }

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }
}
