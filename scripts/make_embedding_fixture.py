#!/usr/bin/env python3
"""Writes the embedding oracle fixtures in tests/fixtures/embeddings/:

minilm.json
    all-MiniLM-L6-v2 run by sentence-transformers on CPU in float32: 20 sentences, the
    input ids sentence-transformers feeds the model (its tokenizer, special tokens
    included, truncated to max_seq_length 256, padding removed), and the embeddings from
    `SentenceTransformer(dir, device="cpu").encode(sentences, batch_size=32,
    normalize_embeddings=False)`. The model's own modules are Transformer -> Pooling
    (mean over tokens) -> Normalize, so these vectors are already L2-normalized;
    `unit_norm` records whether they are. `mean_pooled` holds the same vectors before
    the Normalize module (the output of the Pooling module).

decoder_pooling.json
    For the tiny random-weight models tests/fixtures/tiny/{llama3,qwen2}: three explicit
    id sequences (no BOS) run by transformers AutoModelForCausalLM (float32, CPU,
    attn_implementation="eager", output_hidden_states=True), pooled from
    hidden_states[-1], which in transformers is the output after the final RMSNorm (the
    `capture_outputs` decorator replaces the last recorded layer output with
    `last_hidden_state`; checked below against lm_head, which gives the logits).
    `mean` averages over positions, `last` takes the last position, and `*_normalized`
    are the L2-normalized versions.

Floats are rounded to 7 significant digits.

Requires: pip install torch sentence-transformers transformers safetensors numpy
The MiniLM directory comes from scripts/fetch-minilm.sh. Command used:

    HF_HUB_OFFLINE=1 ~/.cache/llama-rs/oracle-venv/bin/python \\
        scripts/make_embedding_fixture.py ~/.cache/llama-rs/models/all-minilm-l6-v2
"""
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "embeddings")

LONG = (
    "The harbour authority of a small coastal town once decided to repaint every "
    "bollard along the quay in a different colour, reasoning that visiting skippers "
    "would find it easier to remember where they had tied up. The plan worked for a "
    "single summer. By the following spring the salt air had faded the reds into "
    "pinks and the blues into a chalky grey, and the harbourmaster was fielding "
    "complaints from sailors who insisted they had moored beside a yellow post that "
    "now looked exactly like its neighbours. A committee was formed, as committees "
    "usually are, and after eleven meetings it recommended numbered brass plates "
    "instead of paint. The plates were ordered from a foundry two valleys away, "
    "delivered three months late, and fixed with screws that rusted within a year, "
    "leaving green streaks down every post. Children began calling the quay the "
    "zebra wall. Tourists photographed it. A postcard printer put the streaked "
    "bollards on the front of a calendar, which sold better than any calendar the "
    "town had produced before, and the profits paid for a second set of plates, "
    "this time fixed with bronze screws. Nobody removed the streaks, though; by then "
    "the town had grown fond of them. The harbourmaster retired the next winter and "
    "gave a short speech at the sailing club, in which he said that the best "
    "decisions of his career had all been accidents, and that the worst had all "
    "been discussed in committee. The audience laughed, the club secretary wrote "
    "the remark into the minutes, and it was read aloud again at his memorial many "
    "years later, when the brass plates had turned brown and the green streaks had "
    "become part of the stone itself, and a new generation of children walked the "
    "quay counting posts on their way to the ferry each morning before school."
)

SENTENCES = [
    "Hello.",
    "The kettle clicked off just as the rain started.",
    "A quiet library is the best place to think about nothing in particular.",
    "Retrieval quality depends on how documents are split into chunks before they are embedded.",
    "Dogs must be kept on short leads near the ground-nesting birds.",
    "The train to the coast leaves at 07:42 from platform 3, and a return ticket costs 18.50.",
    "Café crème, naïve façade, jalapeño, Übergröße; 東京の天気は晴れです 🌤️ and 漢字 🙂🎉",
    "?!... --- ;;; ((( ))) !!! ???",
    "Mean pooling averages the token vectors while ignoring padding positions.",
    "She planted three rows of beans, two of onions, and one long row of sunflowers along the fence.",
    "Why does the ferry run late every Tuesday?",
    "1234567890 3.14159 2024-06-30 +44 (0)20 7946 0000",
    "OK",
    "The committee approved the budget after a long debate about the cost of new lighting for the sports hall.",
    "An embedding maps a sentence to a point in a space where similar meanings lie close together.",
    LONG,
    "snow",
    "Please return borrowed tools to the shed before dark, and lock the gate behind you.",
    "Under the old bridge, the river slows and widens into a pool where herons wait for fish.",
    "Large batches with sentences of very different lengths need padding and an attention mask.",
]

TINY_INPUTS = [
    [72, 101, 108, 108, 111],
    [3, 250, 17, 99, 128, 64, 5, 200, 31],
    [84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 102, 111, 120],
]


def r7(x):
    """Rounds nested floats to 7 significant digits."""
    if isinstance(x, (list, tuple)):
        return [r7(v) for v in x]
    return float(f"{float(x):.7g}")


def l2n(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def minilm(model_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()
    assert model.max_seq_length == 256, model.max_seq_length
    modules = [type(m).__name__ for m in model]

    emb = model.encode(SENTENCES, batch_size=32, normalize_embeddings=False, convert_to_numpy=True)
    emb = emb.astype(np.float32)

    # The ids exactly as sentence-transformers tokenizes the batch (truncation to
    # max_seq_length included); padding stripped with the attention mask. (The model's
    # tokenizer.json itself carries truncation and fixed padding at 128, which
    # sentence-transformers overrides with max_seq_length.)
    prep = getattr(model, "preprocess", None) or model.tokenize
    features = prep(SENTENCES)
    input_ids = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(features["input_ids"], features["attention_mask"])
    ]
    untruncated = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]

    # The Pooling module's output, before Normalize.
    with torch.no_grad():
        feats = {k: v for k, v in features.items()}
        feats = model[0](feats)
        feats = model[1](feats)
        pooled = feats["sentence_embedding"].float().numpy()

    norms = np.linalg.norm(emb, axis=1)
    unit = bool(np.all(np.abs(norms - 1.0) < 1e-5))
    assert np.allclose(l2n(pooled), emb, atol=1e-5), np.abs(l2n(pooled) - emb).max()

    out = {
        "model": "all-MiniLM-L6-v2",
        "modules": modules,
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "input_ids": input_ids,
        "token_counts_untruncated": untruncated,
        "embeddings": r7(emb.tolist()),
        "unit_norm": unit,
        "norms": r7(norms.tolist()),
        "mean_pooled": r7(pooled.tolist()),
    }
    with open(os.path.join(OUT, "minilm.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
        f.write("\n")
    lens = [len(i) for i in input_ids]
    print(f"minilm.json: modules {modules}, token counts {lens}")
    print(f"  untruncated token counts {untruncated}")
    print(f"  norms min {norms.min():.7f} max {norms.max():.7f}, unit_norm={unit}")


def decoder_pooling():
    from transformers import AutoModelForCausalLM

    models = {}
    for name in ["llama3", "qwen2"]:
        d = os.path.join(ROOT, "tests", "fixtures", "tiny", name)
        model = AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager"
        )
        model.eval()
        vocab = model.config.vocab_size
        rec = {"inputs": [], "mean": [], "last": [], "mean_normalized": [], "last_normalized": []}
        for ids in TINY_INPUTS:
            assert all(0 <= i < vocab for i in ids)
            x = torch.tensor([ids])
            captured = []
            hook = model.model.layers[-1].register_forward_hook(
                lambda mod, args, res: captured.append(res[0] if isinstance(res, tuple) else res)
            )
            with torch.no_grad():
                out = model(input_ids=x, output_hidden_states=True)
            hook.remove()
            with torch.no_grad():
                base = model.model(input_ids=x)
                normed = model.model.norm(captured[0])
            h = out.hidden_states[-1][0]
            assert len(out.hidden_states) == model.config.num_hidden_layers + 1
            # hidden_states[-1] is the final-normed output: the same tensor the base
            # model returns as last_hidden_state, and lm_head of it gives the logits.
            assert torch.equal(h, base.last_hidden_state[0])
            assert torch.allclose(model.lm_head(h), out.logits[0], atol=1e-5)
            # ... and it is the final norm applied to the last decoder layer's output,
            # not that output itself.
            assert torch.allclose(normed[0], h, atol=1e-6)
            assert not torch.allclose(captured[0][0], h, atol=1e-3)
            h = h.double().numpy()
            mean = h.mean(axis=0)
            last = h[-1]
            rec["inputs"].append(ids)
            rec["mean"].append(r7(mean.tolist()))
            rec["last"].append(r7(last.tolist()))
            rec["mean_normalized"].append(r7(l2n(mean).tolist()))
            rec["last_normalized"].append(r7(l2n(last).tolist()))
        models[name] = rec
        print(f"decoder_pooling.json: {name} hidden {model.config.hidden_size}, inputs {[len(i) for i in TINY_INPUTS]}")
    out = {
        "hidden_state": "hidden_states[-1] (after the final norm), float32 forward, no BOS, no padding",
        "models": models,
    }
    with open(os.path.join(OUT, "decoder_pooling.json"), "w", encoding="utf-8") as f:
        json.dump(out, f)
        f.write("\n")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    minilm(sys.argv[1])
    decoder_pooling()


if __name__ == "__main__":
    main()
