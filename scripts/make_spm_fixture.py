#!/usr/bin/env python3
"""Writes tests/fixtures/spm.json: a small SentencePiece BPE vocabulary (with byte
fallback) trained here, and the ids SentencePiece itself gives a few texts.

The Rust test puts this vocabulary into a GGUF file (`tokenizer.ggml.model = llama`),
builds our tokenizer from it and compares. Requires: pip install sentencepiece
Usage: make_spm_fixture.py CORPUS.txt OUT.json
"""
import io
import json
import sys

import sentencepiece as spm

corpus, out = sys.argv[1], sys.argv[2]
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    input=corpus,
    model_writer=model,
    model_type="bpe",
    vocab_size=400,
    byte_fallback=True,
    character_coverage=1.0,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    minloglevel=2,
)
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
n = sp.get_piece_size()
types = []
for i in range(n):
    if sp.is_unknown(i):
        types.append(2)
    elif sp.is_control(i):
        types.append(3)
    elif sp.is_byte(i):
        types.append(6)
    elif sp.is_unused(i):
        types.append(5)
    else:
        types.append(1)
texts = [
    "The river is never the same.",
    "Hello world",
    " leading space and  double  spaces",
    "line one\nline two\n",
    "numbers 12345 and 3.14",
    "unseen: ü é ß 日本語 🎉",
    "tabs\tand\r\nreturns",
    "",
    "a",
]
cases = [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in texts]
with open(out, "w", encoding="utf-8") as f:
    json.dump({
        "generator": "sentencepiece " + spm.__version__,
        "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)],
        "types": types,
        "cases": cases,
    }, f, ensure_ascii=False)
