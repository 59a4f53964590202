#!/usr/bin/env python3
"""Writes tests/fixtures/tiny/gemma3/: a tiny random-weight Gemma 3 text model made by HF
transformers (Gemma3ForCausalLM + Gemma3TextConfig), in the same layout as the other tiny
fixtures (written by shared/oracle/make_tiny_archs.py, whose conventions this reuses):

    config.json, generation_config.json, model.safetensors   as save_pretrained writes them, f32
    tokenizer.json                                            copied from tests/fixtures/tiny/gemma/
                                                              (byte-level, one token per byte)
    reference.json                                            transformers' outputs (see below)

Model: vocab 256, hidden 64, intermediate 160, 4 heads of head_dim 16, 2 kv heads, 4 layers
with layer_types [sliding, sliding, full, sliding], sliding_window 6 (shorter than the 20-token
test sequence), query_pre_attn_scalar 24 (not head_dim, so the attention scale 24**-0.5 is
tested), rope theta 1e6 for full-attention layers and 1e4 for sliding layers, q/k RMSNorm,
four (1 + w) RMSNorms per layer, sqrt(hidden) embedding scale, GeGLU (gelu_pytorch_tanh),
tied embeddings, no softcapping. Weights: transformers init with seed 1234, then matrices x8
and every 1-D parameter (the norm weights, stored as w, used as 1 + w) + N(0, 0.1).

reference.json holds, for IDS (20 ids, no BOS added; f32 CPU eager attention): the logits at
every position, their argmax, greedy 16 tokens from the first 6 ids with the top-1/top-2
margin at each step, the max |diff| between prefill 12 + 8 single-token decode steps and the
full forward, and "hidden_states": transformers' output_hidden_states (num_layers + 1 entries
of [seq][hidden]): entry 0 is the scaled embedding, entry i (1 <= i < L) the output of decoder
layer i-1, and the last entry is the output of the last layer AFTER the final norm
(transformers replaces it with last_hidden_state); the last layer's raw output (before the
final norm) is in "last_layer_output_pre_norm". Floats are rounded to 5 decimals.

Run (python with torch + transformers 5.x; CPU only, a few seconds):

    ~/.cache/llama-rs/oracle-venv/bin/python scripts/make_tiny_gemma3.py
"""
import argparse
import json
import os
import shutil

import torch
import transformers as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

GEMMA3 = dict(
    head_dim=16,
    query_pre_attn_scalar=24,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    sliding_window=6,
    # transformers 5.x: one rope parameter set per layer type (older configs said rope_theta and
    # rope_local_base_freq)
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    use_bidirectional_attention=False,
)

IDS = [1, 17, 200, 45, 3, 99, 128, 7, 64, 250, 31, 12, 5, 180, 77, 2, 90, 140, 33, 8]


def build(**overrides):
    torch.manual_seed(1234)
    cfg = T.Gemma3TextConfig(**{**COMMON, **GEMMA3, **overrides})
    cfg._attn_implementation = "eager"
    m = T.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so the outputs are not all near zero
        for p in m.parameters():
            p.mul_(8.0) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.1)
    return cfg, m


def rnd(t):
    return [[round(float(x), 5) for x in row] for row in t]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/tiny/gemma3"))
    a = ap.parse_args()
    torch.set_num_threads(1)

    cfg, m = build()
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    m.save_pretrained(a.out, safe_serialization=True)
    shutil.copyfile(os.path.join(ROOT, "tests/fixtures/tiny/gemma/tokenizer.json"),
                    os.path.join(a.out, "tokenizer.json"))

    ids = torch.tensor([IDS])
    last_layer = {}
    hook = m.model.layers[-1].register_forward_hook(lambda mod, inp, out: last_layer.update(
        h=(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        o = m(ids, output_hidden_states=True)
        full, hs = o.logits[0], o.hidden_states
    hook.remove()
    assert len(hs) == cfg.num_hidden_layers + 1
    pre_norm = last_layer["h"][0]
    assert torch.allclose(m.model.norm(pre_norm), hs[-1][0]), "hidden_states[-1] is not norm(last layer)"
    assert torch.allclose(m.lm_head(hs[-1][0]), full, atol=1e-4)

    with torch.no_grad():
        # prefill 12, then 8 decode steps
        o = m(ids[:, :12], use_cache=True)
        cache, steps = o.cache, [o.logits[0, -1]]
        for i in range(12, len(IDS)):
            o = m(ids[:, i:i + 1], cache=cache, use_cache=True)
            cache = o.cache
            steps.append(o.logits[0, -1])
        kv_diff = max(float((steps[k] - full[11 + k]).abs().max()) for k in range(len(steps)))
        # greedy 16 from the first 6 ids
        cur, out_ids, margins = ids[:, :6], [], []
        for _ in range(16):
            lg = m(cur).logits[0, -1]
            top = torch.topk(lg, 2)
            out_ids.append(int(top.indices[0]))
            margins.append(round(float(top.values[0] - top.values[1]), 5))
            cur = torch.cat([cur, top.indices[:1].view(1, 1)], dim=1)

        # the sliding window must matter: same weights, window wider than the sequence
        _, wide = build(sliding_window=64)
        wide_logits = wide(ids).logits[0]
        per_pos = (wide_logits - full).abs().max(-1).values
    w = cfg.sliding_window
    print(f"sliding window {w} vs 64: max |logit diff| at positions < {w}: "
          f"{float(per_pos[:w].max()):.3e}, at positions >= {w}: {float(per_pos[w:].max()):.3e}")
    print("  per position:", " ".join(f"{float(x):.2e}" for x in per_pos))
    assert float(per_pos[:w].max()) < 1e-4 and float(per_pos[w:].max()) > 1e-2

    ref = {"architecture": cfg.architectures if cfg.architectures else ["Gemma3ForCausalLM"],
           "transformers": T.__version__, "input_ids": IDS,
           "logits": rnd(full),
           "argmax": [int(x) for x in full.argmax(-1)],
           "greedy_prompt_ids": IDS[:6], "greedy_ids": out_ids, "greedy_margins": margins,
           "kv_prefill12_decode8_max_abs_diff": kv_diff,
           "hidden_states": [rnd(h[0]) for h in hs],
           "last_layer_output_pre_norm": rnd(pre_norm),
           "sliding_window_64_max_abs_logit_diff_per_position": [round(float(x), 5) for x in per_pos],
           "notes": "f32 CPU eager attention; no BOS added; weights: transformers init with seed 1234, "
                    "matrices x8, 1-D params + N(0,0.1). hidden_states: output_hidden_states, "
                    "num_layers+1 entries: [0] = embedding * sqrt(hidden), [i] = output of layer i-1, "
                    "[-1] = final norm applied to the last layer's output (its raw output is "
                    "last_layer_output_pre_norm)."}
    with open(os.path.join(a.out, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(f"gemma3: kv_diff={kv_diff:.2e} greedy={out_ids[:8]} min_margin={min(margins):.3f} "
          f"std={float(full.std()):.2f}")
    print(open(os.path.join(a.out, "config.json")).read())
    print(open(os.path.join(a.out, "generation_config.json")).read())


if __name__ == "__main__":
    main()
