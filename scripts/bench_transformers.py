"""Scoring throughput of transformers on CPU, the baseline for `smelt eval bench --compare-transformers`.

Usage: bench_transformers.py MODEL_DIR --sequences N --seq-len L --repeat R --batch-tokens T

Scores N random token sequences of length L (per-token log-probabilities of
every token after the first: forward, log_softmax, gather), float32,
inference mode, in batches of at most T tokens, R times; prints one JSON line
with the best time and tokens/s. Same work as smelt's bench.
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-tokens", type=int, default=4096)
    a = p.parse_args()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.sequences, max(a.seq_len, 2)), generator=g)
    per_batch = max(1, a.batch_tokens // ids.shape[1])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(max(a.repeat, 1)):
            t = time.perf_counter()
            for s in range(0, ids.shape[0], per_batch):
                x = ids[s : s + per_batch]
                logits = model(input_ids=x).logits[:, :-1].float()
                lp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None])[..., 0]
                lp.sum().item()
            best = min(best, time.perf_counter() - t)
    print(
        json.dumps(
            {
                "engine": "transformers",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_s": load_s,
                "best_s": best,
                "tokens_per_s": ids.numel() / best,
            }
        )
    )


if __name__ == "__main__":
    main()
