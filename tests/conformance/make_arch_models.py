#!/usr/bin/env python3
"""Writes the tiny fixture models of tests/conformance/models added in
session 12: qwen2_*, gemma2_*, llamatied_*, mixtral_* (a base and two
fine-tunes each, random init, each fine-tune = base + N(0, 0.02) noise on
every parameter), llamabin_ft1 (llama_ft1 saved as a PyTorch pickle,
pytorch_model.bin) and lora_llama (a rank-4 PEFT LoRA adapter on
llama_base's q/v/down projections, random init). Needs torch, transformers
(5.24 was used) and peft (0.21.2). Run from tests/conformance:
python3 make_arch_models.py"""
import os
import shutil

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TOK = "models/llama_base"


def make(name, cfg, n_ft=2, scale=0.02):
    model = AutoModelForCausalLM.from_config(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n_ft + 1):
        d = f"models/{name}_{'base' if i == 0 else 'ft%d' % i}"
        if i > 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * scale)
        model.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(TOK, f), d)
        if i > 0:
            model.load_state_dict(sd)


torch.manual_seed(0)
common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
make("qwen2", transformers.Qwen2Config(**common, tie_word_embeddings=False))
make("gemma2", transformers.Gemma2Config(**common, head_dim=16))
# a mistral family was generated here too (and passed); it is not kept
# (llama-shaped), but making it keeps the random stream of the next family
make("mistral_unused", transformers.MistralConfig(**common))
for s in ("base", "ft1", "ft2"):
    shutil.rmtree(f"models/mistral_unused_{s}")
make("llamatied", transformers.LlamaConfig(**common, tie_word_embeddings=True))

# seed 1: Mixtral (kept), Qwen3 and Gemma 3 (made, passed, not kept), LoRA
torch.manual_seed(1)
make("mixtral", transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
for name, cfg in (("qwen3_unused", transformers.Qwen3Config(**common, head_dim=16)),
                  ("gemma3_unused", transformers.Gemma3TextConfig(**common, head_dim=16))):
    make(name, cfg)
    for s in ("base", "ft1", "ft2"):
        shutil.rmtree(f"models/{name}_{s}")
from peft import LoraConfig, get_peft_model  # noqa: E402

base = AutoModelForCausalLM.from_pretrained("models/llama_base")
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                  lora_dropout=0.0, init_lora_weights=False)
get_peft_model(base, lora).save_pretrained("models/lora_llama")

d = "models/llamabin_ft1"
os.makedirs(d, exist_ok=True)
torch.save(load_file("models/llama_ft1/model.safetensors"), f"{d}/pytorch_model.bin")
for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"models/llama_ft1/{f}", d)

# llama_ft1 with 8 more vocabulary rows (embeddings and lm_head, N(0, 0.02)
# from generator seed 5) and 8 added tokens <extra_0..7> (ids 256-263)
import json  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

d = "models/llama_ft1_vocab264"
os.makedirs(d, exist_ok=True)
sd = load_file("models/llama_ft1/model.safetensors")
g = torch.Generator().manual_seed(5)
for k in ("model.embed_tokens.weight", "lm_head.weight"):
    t = sd[k]
    sd[k] = torch.cat([t, (torch.randn(8, t.shape[1], generator=g) * 0.02).to(t.dtype)], 0)
save_file(sd, f"{d}/model.safetensors", metadata={"format": "pt"})
c = json.load(open("models/llama_ft1/config.json"))
c["vocab_size"] = 264
json.dump(c, open(f"{d}/config.json", "w"), indent=2)
t = json.load(open("models/llama_ft1/tokenizer.json"))
for i in range(8):
    t["added_tokens"].append({"id": 256 + i, "content": f"<extra_{i}>", "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False, "special": True})
json.dump(t, open(f"{d}/tokenizer.json", "w"))
shutil.copy("models/llama_ft1/tokenizer_config.json", d)

