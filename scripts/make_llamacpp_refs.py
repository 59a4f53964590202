#!/usr/bin/env python3
"""Writes tests/fixtures/gemma3/llamacpp.json and tests/fixtures/qwen2.5/llamacpp.json:
what llama.cpp itself computes on the two real GGUF models (Gemma 3 270M Q4_K_M and
Qwen2.5-Coder 0.5B Instruct Q4_K_M), so our tests can compare against it.

Each file holds:
  * "perplexity": llama-perplexity on tests/fixtures/smollm2/passage.txt with -c 128 -b 128
    -t 2 (final PPL, its +/-, the running PPL after each chunk, the number of chunks),
    the exact token ids llama.cpp scored, and whether it put BOS in front of each chunk;
  * "greedy": three prompts through llama-server's POST /completion (temperature 0,
    24 new tokens) with the prompt ids, the generated ids, and at every step the top-2
    ids with their log-probabilities (logprob1 - logprob2 is the logit margin);
  * "tokenization" (gemma3 only): the 43 strings of ../shared/reference/tokenization.json
    (plus a few Gemma chat-marker strings) as llama.cpp's /tokenize splits them;
  * the llama.cpp version and the GGUF's sha256 and tokenizer metadata.

Needs only the Python standard library and llama.cpp's binaries, built by
  LLAMA_CPP_JOBS=1 scripts/build-llamacpp.sh llama-perplexity llama-server llama-tokenize
Usage (from anywhere; paths in the repo are found from this file's location):
  scripts/make_llamacpp_refs.py BIN_DIR GEMMA3_GGUF QWEN25_GGUF [--only gemma3|qwen2.5]
  e.g. scripts/make_llamacpp_refs.py "$(scripts/build-llamacpp.sh llama-server)" \
           "$(scripts/fetch-gemma3.sh)" "$(scripts/fetch-qwen2.5.sh)"
"""
import argparse
import hashlib
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PPL_TEXT = FIXTURES / "smollm2" / "passage.txt"
TOKENIZATION_CASES = ROOT.parent / "shared" / "reference" / "tokenization.json"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the sdist scripts/build-llamacpp.sh builds from

PPL_CTX, PPL_BATCH, THREADS = 128, 128, 2
SERVER_CTX, N_PREDICT, N_PROBS = 512, 24, 2
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Why is the sky blue?",
]
# Gemma's own chat markers, tokenized in addition to the shared cases (which use ChatML).
GEMMA_EXTRA_CASES = [
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>Hello<eos>",
]
N_ADD_SPECIAL_CASES = 5  # the first cases are also tokenized with add_special = true


# --- GGUF metadata (header key/values only; arrays are reported by length) ---------

def read_gguf_kv(path):
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
              10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def read_str():
            return f.read(read("<Q")).decode("utf-8", "replace")

        def read_value(t):
            if t in scalar:
                return read(scalar[t])
            if t == 8:
                return read_str()
            if t == 9:
                et, n = read("<I"), read("<Q")
                if et in scalar:
                    f.seek(n * struct.calcsize(scalar[et]), os.SEEK_CUR)
                else:
                    for _ in range(n):
                        read_value(et)
                return {"array_of_type": et, "len": n}
            raise ValueError(f"unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, _n_tensors, n_kv = read("<I"), read("<Q"), read("<Q")
        kv = {"gguf.version": version}
        for _ in range(n_kv):
            key = read_str()
            kv[key] = read_value(read("<I"))
    return kv


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- llama-server ---------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bin_dir, gguf):
        self.port = free_port()
        self.args = [str(Path(bin_dir) / "llama-server"), "-m", str(gguf),
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "-c", str(SERVER_CTX), "-t", str(THREADS), "-np", "1",
                     "--temp", "0", "--no-warmup", "--no-webui"]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError("llama-server did not become healthy in 300 s")
            time.sleep(0.5)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def log_text(self):
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def post(self, path, body):
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def tokenize(self, text, add_special, parse_special=True, with_pieces=False):
        r = self.post("/tokenize", {"content": text, "add_special": add_special,
                                    "parse_special": parse_special, "with_pieces": with_pieces})
        return r["tokens"]

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def logprob(x):
    # The server writes log(0) as a very large negative number or null; keep JSON finite.
    return None if x is None or not math.isfinite(x) else x


def greedy(server, prompt):
    # /completion tokenizes with add_special = true and parse_special = true.
    prompt_ids = server.tokenize(prompt, add_special=True, parse_special=True)
    plain_ids = server.tokenize(prompt, add_special=False, parse_special=True)
    r = server.post("/completion", {
        "prompt": prompt, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1,
        "n_probs": N_PROBS, "post_sampling_probs": False, "cache_prompt": False,
        "return_tokens": True,
    })
    if r["tokens_evaluated"] != len(prompt_ids):
        raise RuntimeError(f"server evaluated {r['tokens_evaluated']} prompt tokens, "
                           f"/tokenize gave {len(prompt_ids)}")
    steps = []
    for i, p in enumerate(r["completion_probabilities"]):
        top = [[t["id"], logprob(t["logprob"])] for t in p["top_logprobs"]]
        if top[0][0] != p["id"] or p["id"] != r["tokens"][i]:
            raise RuntimeError(f"step {i}: generated {p['id']} is not the top-1 {top[0][0]}")
        margin = top[0][1] - top[1][1] if None not in (top[0][1], top[1][1]) else None
        steps.append({"id": p["id"], "token": p["token"], "logprob": logprob(p["logprob"]),
                      "top": top, "margin": margin})
    margins = [s["margin"] for s in steps if s["margin"] is not None]
    i_min = min(range(len(steps)), key=lambda i: steps[i]["margin"]) if margins else None
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "bos_prepended": len(prompt_ids) == len(plain_ids) + 1 and prompt_ids[1:] == plain_ids,
        "generated_ids": r["tokens"],
        "content": r["content"],
        "stop_type": r["stop_type"],
        "steps": steps,
        "min_margin": steps[i_min]["margin"] if i_min is not None else None,
        "min_margin_step": i_min,
    }


# --- llama-perplexity -----------------------------------------------------------------

def run_perplexity(bin_dir, gguf):
    cmd = [str(Path(bin_dir) / "llama-perplexity"), "-m", str(gguf), "-f", str(PPL_TEXT),
           "-c", str(PPL_CTX), "-b", str(PPL_BATCH), "-t", str(THREADS)]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    out = p.stdout + "\n" + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed ({p.returncode}):\n{out[-3000:]}")
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), "
                       r"batch_size=(\d+), n_seq=(\d+)", out)
    if not final or not chunks:
        raise RuntimeError(f"could not parse llama-perplexity's output:\n{out[-3000:]}")
    running = [float(v) for _, v in re.findall(r"\[(\d+)\]([0-9.]+),", out)]
    system_info = re.search(r"system_info: (.*)", out)
    return {
        "ppl": float(final.group(1)),
        "ppl_plus_minus": float(final.group(2)),
        "n_chunks": int(chunks.group(1)),
        "n_ctx": int(chunks.group(2)),
        "n_batch": int(chunks.group(3)),
        "n_seq": int(chunks.group(4)),
        "running_ppl_after_chunk": running,
        "final_line": final.group(0),
        "system_info": system_info.group(1).strip() if system_info else None,
    }


# --- one model ------------------------------------------------------------------------

def version_of(bin_dir):
    p = subprocess.run([str(Path(bin_dir) / "llama-server"), "--version"],
                       capture_output=True, text=True, errors="replace")
    text = (p.stdout + p.stderr).strip()
    m = re.search(r"version: (\S+) \(build (\d+), commit (\w+)\)", text)
    return {
        "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION,
        "version": m.group(1) if m else None,
        "build_number": int(m.group(2)) if m else None,
        "commit": m.group(3) if m else None,
        "version_output": text,
        "note": "llama.cpp vendored in the llama-cpp-python sdist (its CHANGELOG: "
                "ggml-org/llama.cpp@0c1e57098); built outside git, so the build number "
                "is not llama.cpp's real bNNNN count.",
    }


def make(name, bin_dir, gguf, with_tokenization):
    kv = read_gguf_kv(gguf)
    meta_keys = ["general.architecture", "general.name", "general.file_type",
                 "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                 "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
                 "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                 "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"]
    out = {
        "generator": "scripts/make_llamacpp_refs.py",
        "llama_cpp": version_of(bin_dir),
        "model": {"file": Path(gguf).name, "sha256": sha256(gguf),
                  "bytes": Path(gguf).stat().st_size,
                  "metadata": {k: kv[k] for k in meta_keys if k in kv},
                  "n_vocab": kv.get("tokenizer.ggml.tokens", {}).get("len")},
    }
    bos_id = kv.get("tokenizer.ggml.bos_token_id")

    # llama-perplexity's -f drops one trailing newline; it tokenizes with
    # add_special = true, parse_special = false (common_tokenize's defaults).
    text = PPL_TEXT.read_text(encoding="utf-8")
    text_used = text[:-1] if text.endswith("\n") else text
    server = Server(bin_dir, gguf)
    try:
        ppl_ids = server.tokenize(text_used, add_special=True, parse_special=False)
        ppl_plain = server.tokenize(text_used, add_special=False, parse_special=False)
        add_bos = len(ppl_ids) == len(ppl_plain) + 1 and ppl_ids[0] == bos_id
        prompts = [greedy(server, p) for p in GREEDY_PROMPTS]
        tokenization = tokenize_cases(server) if with_tokenization else None
    finally:
        server.close()

    ppl = run_perplexity(bin_dir, gguf)
    if ppl["n_chunks"] != len(ppl_ids) // PPL_CTX:
        raise RuntimeError(f"{len(ppl_ids)} ids give {len(ppl_ids) // PPL_CTX} chunks of "
                           f"{PPL_CTX}, llama-perplexity used {ppl['n_chunks']}")
    first = PPL_CTX // 2
    out["bos"] = {
        "gguf_add_bos_token": kv.get("tokenizer.ggml.add_bos_token"),
        "bos_token_id": bos_id,
        "llama_cpp_adds_bos": add_bos,
    }
    out["perplexity"] = {
        "command": f"llama-perplexity -m MODEL -f tests/fixtures/smollm2/passage.txt "
                   f"-c {PPL_CTX} -b {PPL_BATCH} -t {THREADS}",
        "text_file": "tests/fixtures/smollm2/passage.txt",
        "text_note": "llama.cpp's -f reads the file and removes one trailing newline; the "
                     "ids below are of that text, tokenized with add_special = true and "
                     "parse_special = false, as llama-perplexity does.",
        **ppl,
        "add_bos": add_bos,
        "ids": ppl_ids,
        "n_tokens": len(ppl_ids),
        "n_scored": ppl["n_chunks"] * (PPL_CTX - first - 1),
        "scoring": (
            f"chunk k (k < n_chunks) is ids[{PPL_CTX}*k : {PPL_CTX}*(k+1)], evaluated alone "
            f"from an empty KV cache; "
            + ("its first token is replaced by BOS (id %s) because the vocab adds BOS; " % bos_id
               if add_bos else "no BOS is put in (the vocab does not add BOS); ")
            + f"only the logits at positions {first}..{PPL_CTX - 2} are scored, each "
              f"against the next token ({PPL_CTX - first - 1} per chunk); PPL = "
              f"exp(mean NLL over all scored tokens); +/- = PPL * std(NLL) / sqrt(n - 1). "
              f"Tokens after the last full chunk are not used."
        ),
    }
    out["greedy"] = {
        "endpoint": "llama-server POST /completion",
        "server_args": f"-c {SERVER_CTX} -t {THREADS} -np 1 --temp 0 --no-warmup --no-webui",
        "request": {"n_predict": N_PREDICT, "temperature": 0, "top_k": 1,
                    "n_probs": N_PROBS, "post_sampling_probs": False,
                    "cache_prompt": False, "return_tokens": True},
        "notes": (
            "prompt_ids are /tokenize with add_special = true, parse_special = true (what "
            "/completion uses), checked against the server's tokens_evaluated. "
            + ("BOS was prepended to every prompt. " if all(p["bos_prepended"] for p in prompts)
               else "BOS was not prepended. " if not any(p["bos_prepended"] for p in prompts)
               else "BOS was prepended to some prompts only. ")
            + "steps[i].top holds the top-2 [id, logprob] from the raw logits before "
              "sampling (post_sampling_probs = false: softmax over the whole vocabulary), "
              "so margin = logprob1 - logprob2 is the logit margin. Generation stops at "
              "EOS (stop_type 'eos') or after n_predict tokens ('limit')."
        ),
        "prompts": prompts,
    }
    if tokenization is not None:
        out["tokenization"] = tokenization
    return out


def tokenize_cases(server):
    cases = json.loads(TOKENIZATION_CASES.read_text(encoding="utf-8"))["cases"]
    texts = [(c["text"], "shared") for c in cases] + [(t, "gemma") for t in GEMMA_EXTRA_CASES]
    rows = []
    for i, (text, source) in enumerate(texts):
        with_pieces = server.tokenize(text, add_special=False, with_pieces=True)
        row = {"text": text, "source": source,
               "ids": [t["id"] for t in with_pieces],
               "pieces": [t["piece"] for t in with_pieces]}
        no_special = server.tokenize(text, add_special=False, parse_special=False)
        if no_special != row["ids"]:
            row["ids_parse_special_false"] = no_special
        if i < N_ADD_SPECIAL_CASES or source == "gemma":
            row["ids_add_special"] = server.tokenize(text, add_special=True)
        rows.append(row)
    return {
        "endpoint": "llama-server POST /tokenize",
        "notes": (
            f"ids: add_special = false, parse_special = true (the server's default). "
            f"ids_add_special: add_special = true, for the first {N_ADD_SPECIAL_CASES} shared "
            f"cases and the Gemma extras. ids_parse_special_false is present only where "
            f"parse_special = false gives other ids. pieces: the server's piece per token "
            f"(a list of byte values where the piece alone is not valid UTF-8). The first "
            f"{len(cases)} texts are ../shared/reference/tokenization.json's cases, in order."
        ),
        "cases": rows,
    }


def to_json(data):
    """indent=1 JSON with every list of numbers (or null) on one line."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    flat = re.compile(r"\[\s*((?:-?[0-9.eE+-]+|null)(?:,\s*(?:-?[0-9.eE+-]+|null))*)\s*\]")
    # Only a match that spans lines is a list json.dumps broke up: strings hold no raw newline.
    text = flat.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]"
                    if "\n" in m.group(0) else m.group(0), text)
    if json.loads(text) != data:
        raise AssertionError("to_json changed the data")
    return text + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bin_dir", help="folder of llama-perplexity and llama-server")
    ap.add_argument("gemma3_gguf")
    ap.add_argument("qwen25_gguf")
    ap.add_argument("--only", choices=["gemma3", "qwen2.5"])
    args = ap.parse_args()
    if not PPL_TEXT.exists():
        sys.exit(f"{PPL_TEXT} is missing (copy ../shared/oracle/passage.txt there)")
    models = [("gemma3", args.gemma3_gguf, True), ("qwen2.5", args.qwen25_gguf, False)]
    for name, gguf, with_tok in models:
        if args.only and args.only != name:
            continue
        print(f"{name}: {gguf}", file=sys.stderr)
        data = make(name, args.bin_dir, gguf, with_tok)
        dest = FIXTURES / name / "llamacpp.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(to_json(data), encoding="utf-8")
        p = data["perplexity"]
        print(f"  PPL {p['ppl']} +/- {p['ppl_plus_minus']} over {p['n_chunks']} chunks, "
              f"add_bos {p['add_bos']} -> {dest.relative_to(ROOT)}", file=sys.stderr)
        for g in data["greedy"]["prompts"]:
            print(f"  {g['prompt']!r} -> {g['content']!r} (min margin {g['min_margin']})",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
