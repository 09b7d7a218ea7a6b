#!/usr/bin/env python3
"""Writes the fixture models of tests/conformance/models added in session 13
(run from tests/conformance: python3 make_session13_models.py; needs torch,
safetensors and transformers — 5.24 was used):

- derived from the public llama fixtures: llama_base_bf16, llama_ft1_bf16
  (bfloat16 copies), llama_ft2_f16 (float16 copy), llama_neg1 (−llama_ft1),
  llama_zero (llama_base's shapes, all zeros): mixed input dtypes, exactly
  opposed updates;
- olmo2_{base,ft1,ft2} (random init, seed 11, each fine-tune = base +
  N(0, 0.02) on every parameter; per-head q_norm / k_norm weights) and
  phi_{base,ft1,ft2} (seed 10; a vocabulary-sized lm_head.bias) plus
  phi_ft1_v264 (phi_ft1 with 8 more vocabulary rows and tokens <extra_i>);
  bloom_{base,ft1,ft2} (seed 15; no architecture definition in smelt:
  inferred, vocabulary-sized `transformer.word_embeddings`) plus
  bloom_ft1_v264.
"""
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

M = "models"
TOK = f"{M}/llama_base"


def derive(name, src, fn, dtype=None):
    d = f"{M}/{name}"
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(f"{M}/{src}"):
        if f != "model.safetensors":
            shutil.copy(f"{M}/{src}/{f}", d)
    sd = load_file(f"{M}/{src}/model.safetensors")
    sd = {k: fn(v).contiguous() for k, v in sd.items()}
    save_file(sd, f"{d}/model.safetensors", metadata={"format": "pt"})
    if dtype:
        c = json.load(open(f"{d}/config.json"))
        c["dtype"] = dtype
        json.dump(c, open(f"{d}/config.json", "w"), indent=2)


derive("llama_base_bf16", "llama_base", lambda v: v.bfloat16(), "bfloat16")
derive("llama_ft1_bf16", "llama_ft1", lambda v: v.bfloat16(), "bfloat16")
derive("llama_ft2_f16", "llama_ft2", lambda v: v.half(), "float16")
derive("llama_neg1", "llama_ft1", lambda v: -v)
derive("llama_zero", "llama_base", lambda v: torch.zeros_like(v))


def make(name, cfg, n_ft=2, scale=0.02, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n_ft + 1):
        d = f"{M}/{name}_{'base' if i == 0 else 'ft%d' % i}"
        if i > 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * scale)
        model.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(TOK, f), d)
        if i > 0:
            model.load_state_dict(sd)


def widen_vocab(src, dst, keys, n=8, seed=5):
    """A copy of src with n more vocabulary rows (axis 0 of each of keys)
    and tokens <extra_i>."""
    src, dst = f"{M}/{src}", f"{M}/{dst}"
    os.makedirs(dst, exist_ok=True)
    sd = load_file(f"{src}/model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for k in keys:
        t = sd[k]
        sd[k] = torch.cat([t, (torch.randn(n, *t.shape[1:], generator=g) * 0.02).to(t.dtype)], 0)
    save_file(sd, f"{dst}/model.safetensors", metadata={"format": "pt"})
    c = json.load(open(f"{src}/config.json"))
    c["vocab_size"] = c["vocab_size"] + n
    json.dump(c, open(f"{dst}/config.json", "w"), indent=2)
    t = json.load(open(f"{src}/tokenizer.json"))
    base = len(t["model"]["vocab"])
    for i in range(n):
        t["added_tokens"].append({"id": base + i, "content": f"<extra_{i}>", "single_word": False,
                                  "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    json.dump(t, open(f"{dst}/tokenizer.json", "w"))
    shutil.copy(f"{src}/tokenizer_config.json", dst)


common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
make("phi", transformers.PhiConfig(**common), seed=10)
widen_vocab("phi_ft1", "phi_ft1_v264", ["model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"])
make("olmo2", transformers.Olmo2Config(**common), seed=11)
make("bloom", transformers.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4), seed=15)
widen_vocab("bloom_ft1", "bloom_ft1_v264", ["transformer.word_embeddings.weight"])
