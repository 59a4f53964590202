"""Embedding throughput of ONNX Runtime on CPU, for scripts/bench/bench-embed.sh.

    python bench_embed_ort.py MODEL_DIR ONNX_FILE TEXTS_FILE THREADS

Exports MODEL_DIR (a BERT encoder in transformers' layout) to ONNX_FILE with
torch.onnx.export on first use (dynamic batch and sequence axes, opset 17), then
encodes the texts (one per line) in batches of 32 as sentence-transformers does
(sorted by length, tokenize with padding, the encoder on ONNX Runtime's CPU provider, mean pooling over
the attention mask, L2 normalization), after one warm-up pass, best of three.
Prints `sentences_per_second: <number>` and `min_cosine_vs_torch: <number>` (the
smallest cosine similarity between ONNX Runtime's and torch's embedding of a text, a
check that the export is the same model).
"""
import os
import sys
import time

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModel, AutoTokenizer

model_dir, onnx_file, texts_file, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
texts = [l for l in open(texts_file, encoding="utf-8").read().splitlines() if l.strip()]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
BATCH = 32



class Encoder(torch.nn.Module):
    """The encoder with its inputs by position, as the exporter passes them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


if not os.path.exists(onnx_file):
    model = Encoder(AutoModel.from_pretrained(model_dir).eval())
    sample = tokenizer(texts[:2], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    os.makedirs(os.path.dirname(onnx_file), exist_ok=True)
    tmp = onnx_file + ".tmp"
    with torch.no_grad():
        torch.onnx.export(model, tuple(sample[n] for n in names), tmp, input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    os.replace(tmp, onnx_file)

options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
wanted = {i.name for i in session.get_inputs()}


def encode(batch):
    enc = tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="np")
    feed = {k: v.astype(np.int64) for k, v in enc.items() if k in wanted}
    hidden = session.run(None, feed)[0]
    mask = enc["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def encode_all():
    # Longest first, as sentence-transformers orders them: batches of alike lengths
    # pad little. The vectors come back in the texts' order.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    ranked = [texts[i] for i in order]
    out = np.concatenate([encode(ranked[i:i + BATCH]) for i in range(0, len(ranked), BATCH)])
    vectors = np.empty_like(out)
    vectors[order] = out
    return vectors


encode(texts[:64])
best = float("inf")
for _ in range(3):
    start = time.perf_counter()
    ours = encode_all()
    best = min(best, time.perf_counter() - start)
print(f"sentences_per_second: {len(texts) / best:.1f}")

# The export is the model: compare with torch on the first 64 texts.
model = AutoModel.from_pretrained(model_dir).eval()
with torch.no_grad():
    enc = tokenizer(texts[:64], padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**enc).last_hidden_state.numpy()
mask = enc["attention_mask"].numpy()[..., None].astype(np.float32)
ref = (hidden * mask).sum(1) / mask.sum(1)
ref /= np.linalg.norm(ref, axis=1, keepdims=True)
print(f"min_cosine_vs_torch: {float((ref * ours[:64]).sum(1).min()):.6f}")
