#!/usr/bin/env python3
"""Loads a directory written by `llama convert` with HF transformers and compares its
logits with tests/fixtures/smollm2/logits.json (transformers on the original weights).

Needs: pip install torch transformers safetensors
Usage: check_converted_with_transformers.py DIR
"""
import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

root = pathlib.Path(__file__).resolve().parent.parent
out_dir = sys.argv[1]
ref = json.loads((root / "tests/fixtures/smollm2/logits.json").read_text())
tok = AutoTokenizer.from_pretrained(out_dir)
model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
worst = 0.0
for p in ref["prompts"]:
    ids = tok(p["text"], add_special_tokens=False).input_ids
    assert ids == p["ids"], (p["name"], ids, p["ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert logits.argmax(-1).tolist() == p["per_position_argmax"], p["name"]
    for t in p["last_top20"]:
        worst = max(worst, abs(float(logits[-1, t["id"]]) - t["logit"]))
chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
print(f"transformers loaded {out_dir}: {len(ref['prompts'])} prompts, ids and argmax equal, "
      f"max |top-20 logit diff| = {worst:.2e}; chat template renders {chat!r}")
