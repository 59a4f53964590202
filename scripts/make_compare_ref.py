#!/usr/bin/env python3
"""Writes a reference file of HF transformers' intermediate activations, each named by the
node of our graph that computes the same value, for `llama graph --compare REF.json` (which
reports the first node whose output departs from the reference).

    make_compare_ref.py --model DIR (--prompt TEXT | --ids 1,2,3) --out REF.json [--decimals 6]
                        [--extra]

DIR is an HF model directory (config.json + model.safetensors [+ tokenizer.json]). The model is
loaded with transformers in float32, eager attention, on the CPU. The input ids are --ids, or
--prompt encoded by DIR/tokenizer.json (the `tokenizers` library, add_special_tokens=True).
One forward pass (batch 1) runs with forward hooks on the modules below; each hooked value is
written as a 2-D [seq, features] array (q_norm / k_norm outputs, which are 4-D, become
[seq, heads * head_dim] with head h in columns h*hd .. (h+1)*hd).

Node names (L = layer index), for Llama-like models (Llama, Mistral, Qwen2, Gemma, Gemma 3):

    model.embed_tokens output           inp_embd (inp_scaled for Gemma: sqrt(hidden) applied)
    layers[L].input_layernorm           blk.L.attn_norm
    self_attn.q_proj / k_proj / v_proj  blk.L.attn_q / attn_k / attn_v
    self_attn.q_norm / k_norm           blk.L.attn_q_norm / attn_k_norm   (Gemma 3)
    input / output of self_attn.o_proj  blk.L.attn_out / blk.L.attn_output
    post_attention_layernorm            blk.L.post_attention_norm if the layer has a
                                        pre_feedforward_layernorm (Gemma 3), else blk.L.ffn_norm
    pre_feedforward_layernorm           blk.L.ffn_norm
    post_feedforward_layernorm          blk.L.post_ffw_norm
    mlp.gate_proj / up_proj             blk.L.ffn_gate / blk.L.ffn_up
    input / output of mlp.down_proj     blk.L.ffn_gate_par / blk.L.ffn_down
    layers[L] output                    blk.L.l_out (raw, before any final norm)
    model.norm                          output_norm
    lm_head                             logits

With --extra, also: the input of the ffn norm (the residual sum after attention) as
blk.L.ffn_inp, and mlp.act_fn's output as blk.L.ffn_gelu or blk.L.ffn_silu (by hidden_act).

Output JSON: {"notes", "model", "input_ids", "nodes": [{"name", "shape": [seq, features],
"data": row-major floats rounded to --decimals places after the point}]}, nodes in the order
the forward pass produced them. Modules a model lacks are skipped.

Run (python with torch, transformers 5.x, tokenizers; CPU only):

    ~/.cache/llama-rs/oracle-venv/bin/python scripts/make_compare_ref.py \\
        --model tests/fixtures/tiny/gemma3 --ids 1,17,200,45 --out /tmp/ref.json
"""
import argparse
import json
import os

import torch
import transformers as T

SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM",
             "Gemma3ForCausalLM"}


def input_ids(args):
    if args.ids is not None:
        return [int(s) for s in args.ids.split(",") if s.strip()]
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    return tok.encode(args.prompt, add_special_tokens=True).ids


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class Recorder:
    """Collects hooked tensors as [seq, features] float32 arrays, in call order."""

    def __init__(self, seq):
        self.seq = seq
        self.nodes = {}  # name -> tensor; dicts keep insertion (= call) order
        self.layouts = set()

    def put(self, name, t):
        if name in self.nodes:
            raise SystemExit(f"{name} recorded twice (a module called more than once?)")
        t = t.detach().to(torch.float32)
        if t.shape[0] != 1:
            raise SystemExit(f"{name}: batch {t.shape[0]}, expected 1")
        if t.dim() != 3 or t.shape[1] != self.seq:
            raise SystemExit(f"{name}: unexpected shape {list(t.shape)}")
        self.nodes[name] = t[0].contiguous().clone()

    def put_heads(self, name, t_in, t_out, proj_name):
        """A per-head norm's output, 4-D: [1, seq, heads, hd] or [1, heads, seq, hd]. The
        layout is the one in which the norm's input is the recorded projection output."""
        seq = self.seq
        proj = self.nodes.get(proj_name)
        cands = []
        if t_out.shape[1] == seq:
            cands.append(("[1, seq, heads, hd]", lambda t: t[0].reshape(seq, -1)))
        if t_out.shape[2] == seq:
            cands.append(("[1, heads, seq, hd]", lambda t: t[0].transpose(0, 1).reshape(seq, -1)))
        if proj is not None:
            cands = [c for c in cands if torch.equal(c[1](t_in.detach().float()), proj)]
        if len(cands) != 1:
            raise SystemExit(f"{name}: cannot tell the layout of {list(t_out.shape)}")
        self.layouts.add(f"{name.split('.')[-1]} {cands[0][0]}")
        self.put(name, cands[0][1](t_out).unsqueeze(0))


def hook_model(model, rec, cfg, extra):
    inner = model.model
    hooks = []

    def out_hook(name):
        return lambda mod, inp, out: rec.put(name, first(out))

    def in_hook(name):  # forward pre-hook: the module's first input
        return lambda mod, inp: rec.put(name, inp[0])

    def in_out_hook(name_in, name_out):
        def f(mod, inp, out):
            rec.put(name_in, inp[0])
            rec.put(name_out, first(out))
        return f

    def heads_hook(name, proj_name):
        return lambda mod, inp, out: rec.put_heads(name, inp[0], first(out), proj_name)

    emb = inner.embed_tokens
    gemma = cfg.model_type.startswith("gemma")
    if not gemma:
        hooks.append(emb.register_forward_hook(out_hook("inp_embd")))
    elif hasattr(emb, "embed_scale"):  # GemmaTextScaledWordEmbedding: the module scales
        hooks.append(emb.register_forward_hook(out_hook("inp_scaled")))
    else:  # older Gemma code scales in the model's forward: take layer 0's input
        hooks.append(inner.layers[0].register_forward_pre_hook(in_hook("inp_scaled")))

    act_name = "ffn_gelu" if "gelu" in str(getattr(cfg, "hidden_activation", None)
                                           or getattr(cfg, "hidden_act", "")) else "ffn_silu"
    for L, layer in enumerate(inner.layers):
        b = f"blk.{L}."
        at, mlp = layer.self_attn, layer.mlp
        sandwich = hasattr(layer, "pre_feedforward_layernorm")
        act = getattr(mlp, "act_fn", None)
        ffn_norm = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
        plan = [
            (layer.input_layernorm, out_hook(b + "attn_norm")),
            (getattr(at, "q_proj", None), out_hook(b + "attn_q")),
            (getattr(at, "k_proj", None), out_hook(b + "attn_k")),
            (getattr(at, "v_proj", None), out_hook(b + "attn_v")),
            (getattr(at, "q_norm", None), heads_hook(b + "attn_q_norm", b + "attn_q")),
            (getattr(at, "k_norm", None), heads_hook(b + "attn_k_norm", b + "attn_k")),
            (at.o_proj, in_out_hook(b + "attn_out", b + "attn_output")),
            (layer.post_attention_layernorm if sandwich else None,
             out_hook(b + "post_attention_norm")),
            (ffn_norm, in_out_hook(b + "ffn_inp", b + "ffn_norm") if extra
             else out_hook(b + "ffn_norm")),
            (getattr(mlp, "gate_proj", None), out_hook(b + "ffn_gate")),
            (act if extra and isinstance(act, torch.nn.Module) else None, out_hook(b + act_name)),
            (getattr(mlp, "up_proj", None), out_hook(b + "ffn_up")),
            (mlp.down_proj, in_out_hook(b + "ffn_gate_par", b + "ffn_down")),
            (getattr(layer, "post_feedforward_layernorm", None), out_hook(b + "post_ffw_norm")),
            (layer, out_hook(b + "l_out")),
        ]
        for mod, fn in plan:
            if mod is not None:
                hooks.append(mod.register_forward_hook(fn))
    hooks.append(inner.norm.register_forward_hook(out_hook("output_norm")))
    hooks.append(model.lm_head.register_forward_hook(out_hook("logits")))
    return hooks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF directory (config.json + model.safetensors)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, encoded by DIR/tokenizer.json with special tokens")
    src.add_argument("--ids", help="comma-separated token ids")
    ap.add_argument("--out", required=True, help="where to write the JSON")
    ap.add_argument("--decimals", type=int, default=6, help="decimal places kept (default 6)")
    ap.add_argument("--extra", action="store_true", help="also record ffn_inp and the activation")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = T.AutoConfig.from_pretrained(args.model)
    arch = (cfg.architectures or ["?"])[0]
    if arch not in SUPPORTED:
        print(f"warning: {arch} is not one of {sorted(SUPPORTED)}; the names may not fit")
    model = T.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager").eval()
    ids = input_ids(args)
    seq = len(ids)
    x = torch.tensor([ids])

    rec = Recorder(seq)
    hooks = hook_model(model, rec, cfg, args.extra)
    with torch.no_grad():
        logits = model(x).logits[0]
    for h in hooks:
        h.remove()
    with torch.no_grad():
        again = model(x).logits[0]

    # Sanity: the hooked logits are the model's, and the last l_out is the raw layer output.
    nodes = rec.nodes
    assert torch.equal(nodes["logits"], logits), "hooked lm_head output != model(ids).logits"
    assert torch.equal(logits, again), "forward with hooks != forward without"
    last = f"blk.{len(model.model.layers) - 1}.l_out"
    with torch.no_grad():
        normed = model.model.norm(nodes[last].unsqueeze(0))[0]
    assert torch.equal(normed, nodes["output_norm"]), f"norm({last}) != output_norm"
    assert not torch.allclose(nodes[last], nodes["output_norm"]), f"{last} is already normed"
    # Every layer's l_out feeds the next layer (an l_out is the layer's raw output).
    for L in range(1, len(model.model.layers)):
        key = f"blk.{L}.ffn_inp"
        if key in nodes:
            prev, attn = nodes[f"blk.{L - 1}.l_out"], nodes.get(f"blk.{L}.post_attention_norm",
                                                                nodes[f"blk.{L}.attn_output"])
            assert torch.allclose(prev + attn, nodes[key], atol=1e-4, rtol=1e-5), key

    d = args.decimals
    layouts = ", ".join(sorted(rec.layouts)) or "none"
    out = {
        "notes": (f"Made by scripts/make_compare_ref.py: HF transformers {T.__version__} "
                  f"(torch {torch.__version__}), {arch}, float32, eager attention, CPU, one "
                  f"forward pass of batch 1 with forward hooks; each node is the hooked module "
                  f"value as [seq, features], rounded to {d} decimals; nodes in call order. "
                  f"Per-head norm outputs were {layouts} and are written as [seq, heads*hd], "
                  f"head-major. Checked: logits == model(ids).logits, output_norm == "
                  f"norm({last})."),
        "model": os.path.basename(os.path.normpath(args.model)),
        "input_ids": ids,
        "nodes": [{"name": k, "shape": list(v.shape),
                   "data": [round(float(f), d) for f in v.reshape(-1).tolist()]}
                  for k, v in nodes.items()],
    }
    with open(args.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(nodes)} nodes, {seq} tokens, "
          f"{os.path.getsize(args.out)} bytes; per-head norm layouts: {layouts}")


if __name__ == "__main__":
    main()
