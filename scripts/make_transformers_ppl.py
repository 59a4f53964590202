#!/usr/bin/env python3
"""Perplexity of a GGUF model's text under HF transformers, in llama-perplexity's windows:
the exact f32 oracle for our perplexity on a quantized file, and the same run with
llama.cpp's activation quantization emulated, which shows where llama.cpp's own number
comes from.

transformers loads the GGUF and dequantizes every weight to f32 (the same weights our
`--precision f32` path runs). The ids and windows are those that llama.cpp scored,
from the model's llamacpp.json (scripts/make_llamacpp_refs.py): window k is
ids[n_ctx*k : n_ctx*(k+1)], BOS in place of its first token where the model adds BOS,
positions n_ctx/2 .. n_ctx-2 scored.

The emulation quantizes the input of every matmul as llama.cpp's CPU backend does
before its integer dot products: blocks of 32 with an f16 scale (Q8_0) for Q4_0..Q8_0
weights, blocks of 256 with an f32 scale (Q8_K) for K-quant weights.

Usage: make_transformers_ppl.py GGUF LLAMACPP_JSON OUT_JSON   (torch, transformers, gguf)
"""
import json, math, os, sys

import gguf
import torch
import transformers
from transformers import AutoModelForCausalLM


def q8(x, block):
    shape = x.shape
    x = x.reshape(-1, block)
    d = x.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(x / safe) * (d > 0)
    scale = d.half().float() if block == 32 else d
    return (q * scale).reshape(shape)


def perplexity(model, ids, n_ctx, n_chunks, bos):
    total, n, running = 0.0, 0, []
    with torch.no_grad():
        for c in range(n_chunks):
            chunk = ids[n_ctx * c:n_ctx * (c + 1)]
            if bos is not None:
                chunk = [bos] + chunk[1:]
            lp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), -1)
            for p in range(n_ctx // 2, n_ctx - 1):
                total -= float(lp[p, chunk[p + 1]])
                n += 1
            running.append(math.exp(total / n))
    return running


def main():
    path, ref_path, out = sys.argv[1:4]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    ref = json.load(open(ref_path))
    p = ref["perplexity"]
    bos = ref["bos"]["bos_token_id"] if p["add_bos"] else None
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
        dtype=torch.float32)
    model.eval()
    model.config._attn_implementation = "eager"
    exact = perplexity(model, p["ids"], p["n_ctx"], p["n_chunks"], bos)

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    ours = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        for part in (layer.self_attn, layer.mlp):
            for name, mod in part.named_children():
                if name in ours:
                    ty = types[f"blk.{i}.{ours[name]}.weight"]
                    block = 256 if ty.endswith("_K") else 32
                    mod.register_forward_pre_hook(lambda m, a, b=block: (q8(a[0], b),))
    head = "output.weight" if "output.weight" in types else "token_embd.weight"
    head_block = 256 if types[head].endswith("_K") else 32
    model.lm_head.register_forward_pre_hook(lambda m, a: (q8(a[0], head_block),))
    emulated = perplexity(model, p["ids"], p["n_ctx"], p["n_chunks"], bos)

    json.dump({
        "notes": __doc__.strip().splitlines()[0] + f" transformers {transformers.__version__}, "
                 f"torch {torch.__version__}, eager attention, f32.",
        "model": os.path.basename(path),
        "n_ctx": p["n_ctx"], "n_chunks": p["n_chunks"], "bos": bos,
        "ppl_f32": exact[-1], "running_f32": exact,
        "ppl_q8_activations": emulated[-1], "running_q8_activations": emulated,
        "ppl_llamacpp": p["ppl"],
    }, open(out, "w"), indent=1)
    print(f"{os.path.basename(path)}: f32 {exact[-1]:.4f}, with Q8 activations "
          f"{emulated[-1]:.4f}, llama.cpp {p['ppl']:.4f}")


if __name__ == "__main__":
    main()
