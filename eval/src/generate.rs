//! Greedy decoding with a KV cache, batched with left padding (padding keys
//! are masked and real tokens keep positions 0, 1, …).

use candle_core::D;

use crate::model::{Cache, Model};
use crate::{Result, c, err};

/// Default prompts per decoding batch.
pub const DEFAULT_GEN_BATCH: usize = 32;

/// Greedily extends each prompt by up to `max_new[i]` tokens. `stop(i,
/// generated)` is asked after each new token; decoding of that prompt ends
/// when it returns true or an EOS id is produced (the EOS is not returned).
pub fn greedy(
    model: &Model,
    prompts: &[Vec<u32>],
    max_new: &[usize],
    eos: &std::collections::BTreeSet<u32>,
    batch: usize,
    stop: &dyn Fn(usize, &[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    if prompts.len() != max_new.len() {
        return err("greedy: one max_new_tokens per prompt");
    }
    let mut out = vec![vec![]; prompts.len()];
    let mut order: Vec<usize> = (0..prompts.len()).filter(|&i| max_new[i] > 0).collect();
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() && max_new[i] > 0 {
            return err(format!("prompt {i} has no tokens"));
        }
    }
    order.sort_by_key(|&i| prompts[i].len());
    for group in order.chunks(batch.max(1)) {
        let res = greedy_batch(model, prompts, max_new, eos, group, stop)?;
        for (&i, r) in group.iter().zip(res) {
            out[i] = r;
        }
    }
    Ok(out)
}

fn greedy_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    max_new: &[usize],
    eos: &std::collections::BTreeSet<u32>,
    group: &[usize],
    stop: &dyn Fn(usize, &[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let b = group.len();
    let l = group.iter().map(|&i| prompts[i].len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b);
    let mut pos = Vec::with_capacity(b);
    for &i in group {
        let p = &prompts[i];
        let pad = l - p.len();
        let mut row = vec![p[0]; pad];
        row.extend_from_slice(p);
        ids.push(row);
        let mut pr = vec![-1i64; pad];
        pr.extend(0..p.len() as i64);
        pos.push(pr);
    }
    let mut cache = Cache::new(model, b);
    let mut gens: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done: Vec<bool> = vec![false; b];
    let mut step_ids = ids;
    let mut step_pos = pos;
    let limit = group.iter().map(|&i| max_new[i]).max().unwrap_or(0);
    for step in 0..limit {
        let hidden = model.forward(&step_ids, &step_pos, Some(&mut cache))?;
        let t = step_ids[0].len();
        let last = c(c(hidden.narrow(1, t - 1, 1))?.squeeze(1))?; // [B, H]
        let logits = model.logits(&last)?;
        let next: Vec<u32> = c(c(logits.argmax(D::Minus1))?.to_vec1::<u32>())?;
        for (k, &i) in group.iter().enumerate() {
            if done[k] {
                continue;
            }
            let tok = next[k];
            if eos.contains(&tok) {
                done[k] = true;
                continue;
            }
            gens[k].push(tok);
            if gens[k].len() >= max_new[i] || stop(i, &gens[k]) {
                done[k] = true;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        step_ids = next.iter().map(|&t| vec![t]).collect();
        step_pos = group
            .iter()
            .map(|&i| vec![(prompts[i].len() + step) as i64])
            .collect();
    }
    Ok(gens)
}
