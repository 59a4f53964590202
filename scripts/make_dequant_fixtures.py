#!/usr/bin/env python3
"""Writes tests/fixtures/dequant.json: blocks of every GGML type this runtime reads,
with the values the `gguf` Python package (llama.cpp's reference) dequantizes them to.

The Rust test writes these bytes into a GGUF file of its own, reads them back through
our loader and compares. Requires: pip install gguf numpy
Usage: make_dequant_fixtures.py OUT.json
"""
import importlib.metadata
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

rng = np.random.default_rng(20261127)


def f16_bytes(lo, hi, n):
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8)


def blocks(qtype, n_blocks):
    """Random payloads with well-formed (finite, moderate) f16 scales."""
    out = []
    for _ in range(n_blocks):
        if qtype == T.Q4_0:
            b = np.concatenate([f16_bytes(-0.1, 0.1, 1), rng.integers(0, 256, 16, dtype=np.uint8)])
        elif qtype == T.Q4_1:
            b = np.concatenate([f16_bytes(0.001, 0.1, 1), f16_bytes(-0.5, 0.5, 1), rng.integers(0, 256, 16, dtype=np.uint8)])
        elif qtype == T.Q5_0:
            b = np.concatenate([f16_bytes(-0.1, 0.1, 1), rng.integers(0, 256, 4 + 16, dtype=np.uint8)])
        elif qtype == T.Q5_1:
            b = np.concatenate([f16_bytes(0.001, 0.1, 1), f16_bytes(-0.5, 0.5, 1), rng.integers(0, 256, 4 + 16, dtype=np.uint8)])
        elif qtype == T.Q8_0:
            b = np.concatenate([f16_bytes(-0.01, 0.01, 1), rng.integers(0, 256, 32, dtype=np.uint8)])
        elif qtype == T.Q4_K:
            b = np.concatenate([f16_bytes(0.0005, 0.01, 2), rng.integers(0, 256, 12 + 128, dtype=np.uint8)])
        elif qtype == T.Q5_K:
            b = np.concatenate([f16_bytes(0.0005, 0.01, 2), rng.integers(0, 256, 12 + 32 + 128, dtype=np.uint8)])
        elif qtype == T.Q6_K:
            b = np.concatenate([rng.integers(0, 256, 128 + 64 + 16, dtype=np.uint8), f16_bytes(-0.01, 0.01, 1)])
        else:
            raise ValueError(qtype)
        out.append(b.astype(np.uint8))
    return np.concatenate(out)


cases = []
for qtype, shape in [
    (T.F32, (3, 8)),
    (T.F16, (3, 8)),
    (T.BF16, (3, 8)),
    (T.Q4_0, (2, 64)),
    (T.Q4_1, (2, 64)),
    (T.Q8_0, (2, 64)),
    (T.Q4_K, (2, 256)),
    (T.Q6_K, (2, 256)),
    (T.Q5_0, (2, 64)),
    (T.Q5_1, (2, 64)),
    (T.Q5_K, (2, 256)),
]:
    values = rng.standard_normal(shape).astype(np.float32)
    if qtype == T.F32:
        raw = values.view(np.uint8)
    elif qtype == T.F16:
        raw = values.astype(np.float16).view(np.uint8)
    elif qtype == T.BF16:
        raw = quants.quantize(values, T.BF16)
    else:
        block, size = quants.GGML_QUANT_SIZES[qtype]
        raw = blocks(qtype, shape[0] * shape[1] // block)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(shape[0], -1)
    expected = quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
    assert np.isfinite(expected).all()
    cases.append({
        "type": qtype.name,
        "type_id": int(qtype),
        "shape": list(shape),
        "bytes": raw.tobytes().hex(),
        "values": [float(v) for v in expected],
    })

with open(sys.argv[1], "w") as f:
    json.dump({"generator": "gguf " + importlib.metadata.version("gguf"), "cases": cases}, f)
