"""Embedding throughput of sentence-transformers on CPU, for scripts/bench/bench-embed.sh.

    python bench_embed_st.py MODEL_DIR TEXTS_FILE THREADS

Prints `sentences_per_second: <number>` for the texts (one per line) encoded in
batches of 32, after one warm-up pass, best of three.
"""
import sys
import time

import torch
from sentence_transformers import SentenceTransformer

model_dir, texts_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
texts = [l for l in open(texts_file, encoding="utf-8").read().splitlines() if l.strip()]
model = SentenceTransformer(model_dir, device="cpu")
model.encode(texts[:64], batch_size=32)
best = float("inf")
for _ in range(3):
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    best = min(best, time.perf_counter() - start)
print(f"sentences_per_second: {len(texts) / best:.1f}")
