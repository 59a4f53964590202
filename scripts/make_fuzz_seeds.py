#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs into tests/fixtures/fuzz/<target>/seed-*.

Seeds are small real inputs of each kind (a 1-layer Llama as GGUF in f32, Q8_0 and
Q4_0 blocks, with a SentencePiece or a byte-level BPE vocabulary and a chat template;
the same model as a safetensors checkpoint; the chat templates of SmolLM2 and
Qwen2.5 with real conversations; real OpenAI requests), made small so the fuzzer runs
fast. They are also the regression corpus's first entries: the test suite replays
every file of tests/fixtures/fuzz/ through the harness. Standard library only;
deterministic (a fixed linear congruential generator), so rerunning changes nothing.

    python3 scripts/make_fuzz_seeds.py
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "fuzz")
SEP = b"\n--8<--\n"

HIDDEN, FF, HEADS, KV_HEADS, LAYERS, CONTEXT = 32, 64, 2, 1, 1, 64
HEAD_DIM = HIDDEN // HEADS


class Lcg:
    def __init__(self, seed):
        self.s = seed

    def f32(self):
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) % 2**64
        return ((self.s >> 40) / 2**24 - 0.5) * 0.2


def floats(rng, n):
    return [rng.f32() for _ in range(n)]


# ---- GGUF -------------------------------------------------------------------------
U32, F32, BOOL, STRING, ARRAY, I32 = 4, 6, 7, 8, 9, 5


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv_value(ty, v):
    if ty == U32:
        return struct.pack("<I", v)
    if ty == I32:
        return struct.pack("<i", v)
    if ty == F32:
        return struct.pack("<f", v)
    if ty == BOOL:
        return struct.pack("<B", v)
    if ty == STRING:
        return gstr(v)
    raise ValueError(ty)


def kv_array(ty, items):
    return struct.pack("<IQ", ty, len(items)) + b"".join(kv_value(ty, i) for i in items)


def f16(x):
    return struct.pack("<e", x)


def q8_0(values):
    out = b""
    for i in range(0, len(values), 32):
        block = values[i:i + 32]
        d = max(abs(v) for v in block) / 127 or 1.0
        out += f16(d) + bytes((round(v / d) & 0xFF) for v in block)
    return out


def q4_0(values):
    out = b""
    for i in range(0, len(values), 32):
        block = values[i:i + 32]
        m = max(block, key=abs)
        d = m / -8 or 1.0
        q = [min(15, max(0, round(v / d + 8))) for v in block]
        out += f16(d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return out


GGML = {"f32": 0, "q4_0": 2, "q8_0": 8}


def encode(values, ty):
    if ty == "f32":
        return struct.pack(f"<{len(values)}f", *values)
    return {"q8_0": q8_0, "q4_0": q4_0}[ty](values)


def llama_tensors(vocab, rng):
    """(gguf name, row-major shape) of a 1-layer Llama."""
    t = [("token_embd.weight", [vocab, HIDDEN]), ("output_norm.weight", [HIDDEN]),
         ("output.weight", [vocab, HIDDEN])]
    for l in range(LAYERS):
        p = f"blk.{l}."
        t += [(p + "attn_norm.weight", [HIDDEN]), (p + "attn_q.weight", [HIDDEN, HIDDEN]),
              (p + "attn_k.weight", [KV_HEADS * HEAD_DIM, HIDDEN]),
              (p + "attn_v.weight", [KV_HEADS * HEAD_DIM, HIDDEN]),
              (p + "attn_output.weight", [HIDDEN, HIDDEN]), (p + "ffn_norm.weight", [HIDDEN]),
              (p + "ffn_gate.weight", [FF, HIDDEN]), (p + "ffn_up.weight", [FF, HIDDEN]),
              (p + "ffn_down.weight", [HIDDEN, FF])]
    out = []
    for name, shape in t:
        n = 1
        for d in shape:
            n *= d
        values = [1.0 + v for v in floats(rng, n)] if name.endswith("norm.weight") else floats(rng, n)
        out.append((name, shape, values))
    return out


SPM_PIECES = ["<unk>", "<s>", "</s>", "▁", "▁the", "▁a", "e", "t", "a", "o", "n", "h", "l",
              "d", "r", "s", "i", "c", "u", "m", "w", "f", "g", "y", "p", "b", "▁H", ",",
              ".", "!", "<0x0A>", "<0xF0>"]
BPE_PIECES = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", "Ġt", "th", "Ġth", "e", "t",
              "h", "a", "o", "n", "l", "d", "r", "s", "i", "H", "W", ",", ".", "!", "Ċ", "c",
              "u", "m", "w", "f", "g", "y", "p"]
BPE_MERGES = ["Ġ t", "t h", "Ġ th"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gguf(ty="f32", tokenizer="llama", arch="llama"):
    rng = Lcg(7)
    pieces = SPM_PIECES if tokenizer == "llama" else BPE_PIECES
    vocab = len(pieces)
    kv = [
        ("general.architecture", STRING, kv_value(STRING, arch)),
        ("general.alignment", U32, kv_value(U32, 32)),
        (f"{arch}.block_count", U32, kv_value(U32, LAYERS)),
        (f"{arch}.context_length", U32, kv_value(U32, CONTEXT)),
        (f"{arch}.embedding_length", U32, kv_value(U32, HIDDEN)),
        (f"{arch}.feed_forward_length", U32, kv_value(U32, FF)),
        (f"{arch}.attention.head_count", U32, kv_value(U32, HEADS)),
        (f"{arch}.attention.head_count_kv", U32, kv_value(U32, KV_HEADS)),
        (f"{arch}.attention.layer_norm_rms_epsilon", F32, kv_value(F32, 1e-5)),
        (f"{arch}.rope.freq_base", F32, kv_value(F32, 10000.0)),
        (f"{arch}.vocab_size", U32, kv_value(U32, vocab)),
        ("tokenizer.ggml.model", STRING, kv_value(STRING, "llama" if tokenizer == "llama" else "gpt2")),
        ("tokenizer.ggml.tokens", ARRAY, kv_array(STRING, pieces)),
        ("tokenizer.ggml.token_type", ARRAY,
         kv_array(I32, [2 if p == "<unk>" else 3 if p.startswith("<") and not p.startswith("<0x")
                        else 6 if p.startswith("<0x") else 1 for p in pieces])),
        ("tokenizer.ggml.bos_token_id", U32, kv_value(U32, 1)),
        ("tokenizer.ggml.eos_token_id", U32, kv_value(U32, 2)),
        ("tokenizer.chat_template", STRING, kv_value(STRING, TEMPLATE)),
    ]
    if tokenizer == "llama":
        kv.append(("tokenizer.ggml.scores", ARRAY, kv_array(F32, [-float(i) for i in range(vocab)])))
        kv.append(("tokenizer.ggml.add_bos_token", BOOL, kv_value(BOOL, 1)))
    else:
        kv.append(("tokenizer.ggml.merges", ARRAY, kv_array(STRING, BPE_MERGES)))
        kv.append(("tokenizer.ggml.pre", STRING, kv_value(STRING, "qwen2")))
    weights = llama_tensors(vocab, rng)
    if arch == "qwen2":
        # Qwen2 has biases on the q, k and v projections.
        for l in range(LAYERS):
            for part, width in (("q", HIDDEN), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
                weights.append((f"blk.{l}.attn_{part}.bias", [width], floats(rng, width)))
    tensors = []
    for name, shape, values in weights:
        t = "f32" if len(shape) == 1 else ty
        tensors.append((name, shape, GGML[t], encode(values, t)))
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        out += gstr(k) + struct.pack("<I", t) + v
    offset = 0
    for name, shape, t, data in tensors:
        out += gstr(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", t, offset)
        offset += -(-len(data) // 32) * 32
    out += b"\0" * (-len(out) % 32)
    for _, _, _, data in tensors:
        out += data + b"\0" * (-len(data) % 32)
    return out


# ---- safetensors ------------------------------------------------------------------
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, l, part, w = name.split(".")
    return f"model.layers.{l}.{HF_NAMES[part]}.{w}"


def safetensors(vocab, bias=False):
    rng = Lcg(11)
    tensors = [(hf_name(n), s, v) for n, s, v in llama_tensors(vocab, rng)]
    if bias:
        for proj, width in (("q_proj", HIDDEN), ("k_proj", KV_HEADS * HEAD_DIM),
                            ("v_proj", KV_HEADS * HEAD_DIM)):
            tensors.append((f"model.layers.0.self_attn.{proj}.bias", [width], floats(rng, width)))
    header, data = {}, b""
    for name, shape, values in tensors:
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def hf_config(vocab, model_type="llama"):
    return json.dumps({
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": model_type, "hidden_size": HIDDEN, "intermediate_size": FF,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS, "max_position_embeddings": CONTEXT, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }, indent=1).encode()


def read(*path):
    with open(os.path.join(ROOT, *path), "rb") as f:
        return f.read()


def main():
    seeds = {}
    tiny_tok = read("tests", "fixtures", "tiny", "llama3", "tokenizer.json")
    tiny_vocab = 256
    seeds["gguf"] = {
        "seed-llama-f32-spm.gguf": gguf("f32", "llama"),
        "seed-llama-q8_0-bpe.gguf": gguf("q8_0", "gpt2"),
        "seed-llama-q4_0-spm.gguf": gguf("q4_0", "llama"),
        "seed-qwen2-q8_0-bpe.gguf": gguf("q8_0", "gpt2", arch="qwen2"),
    }
    tok_config = json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}).encode()
    seeds["safetensors"] = {
        "seed-llama": SEP.join([hf_config(tiny_vocab), safetensors(tiny_vocab), tiny_tok,
                                tok_config, b'{"eos_token_id": 2}']),
        "seed-qwen2-bias": SEP.join([hf_config(tiny_vocab, "qwen2"), safetensors(tiny_vocab, bias=True),
                                     tiny_tok]),
    }
    text = "Hello world, the cat sat.\nÉté 🦙 <|im_start|> <s> 123".encode()
    seeds["tokenizer"] = {
        "seed-spm": SEP.join([gguf("q4_0", "llama"), text, bytes(range(0, 64))]),
        "seed-bpe": SEP.join([gguf("q4_0", "gpt2"), text, bytes(range(0, 64))]),
        "seed-json": SEP.join([tiny_tok, text, bytes(range(0, 200, 3))]),
        "seed-json-code": SEP.join([tiny_tok, "    indented\tcode() {}".encode(), b"\x01\x00\x02\x00"]),
    }
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    qwen = json.loads(read("tests", "fixtures", "qwen2.5", "chat_tools.json"))
    smol = read("tests", "fixtures", "smollm2", "hf", "chat_template.jinja")
    case = qwen["cases"][0]
    seeds["chat_template"] = {
        "seed-smollm2": SEP.join([smol, json.dumps(conversation).encode(), b"", b"<s>", b"</s>"]),
        "seed-qwen-tools": SEP.join([qwen["chat_template"].encode(), json.dumps(case["messages"]).encode(),
                                     json.dumps(case["tools"]).encode(), b"", b"<|im_end|>"]),
        "seed-chatml": SEP.join([TEMPLATE.encode(), json.dumps(conversation).encode()]),
    }
    seeds["sampler"] = {
        "seed-greedy": struct.pack("<6f", 0.0, 0.0, 0.0, 1.0, 0.0, 0.0) + struct.pack("<HHQB", 0xFFFF, 64, 1, 0)
        + struct.pack("<8f", 1, 2, 3, 4, 3, 2, 1, 0),
        "seed-chat": struct.pack("<6f", 0.8, 0.95, 0.05, 1.1, 0.5, 0.5) + struct.pack("<HHQB", 40, 64, 7, 2)
        + struct.pack("<HfHf", 1, -100.0, 3, 2.5) + struct.pack("<16f", *[i / 3 for i in range(16)]),
    }
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    seeds["server"] = {
        "seed-chat": b"\x00" + json.dumps(chat).encode(),
        "seed-chat-stream": b"\x00" + json.dumps({**chat, "stream": True, "stream_options": {"include_usage": True},
                                                  "temperature": 0.7, "seed": 3, "logprobs": True,
                                                  "top_logprobs": 2}).encode(),
        "seed-completions": b"\x01" + json.dumps({"prompt": ["ab", "cd"], "max_tokens": 4, "echo": True,
                                                  "stop": ["x"], "logit_bias": {"5": -100}, "n": 2}).encode(),
        "seed-completions-ids": b"\x01" + json.dumps({"prompt": [[5, 6, 7], [8]], "max_tokens": 3,
                                                      "stream": True}).encode(),
        "seed-embeddings": b"\x02" + json.dumps({"input": ["a b", "c"], "encoding_format": "base64"}).encode(),
        "seed-models": b"\x03",
        "seed-model": b"\x04model",
        "seed-health": b"\x05",
        "seed-metrics": b"\x06",
        "seed-page": b"\x07",
    }
    for target, files in seeds.items():
        d = os.path.join(OUT, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    print(OUT)


if __name__ == "__main__":
    main()
