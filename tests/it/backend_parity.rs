//! Every op kind of the IR, and every tiny model, on each backend against ndarray (the
//! reference), by normalized error: llama.cpp's test-backend-ops, in our terms.

use crate::common::*;
use burn::tensor::Device;
use llama::graph::{
    F32Bits, Graph, KvKind, NodeId, Op, ParamKind, Pipeline, Program, RopeScaling, Taps, Value,
};

/// f32 ops must agree to this normalized error (test-backend-ops' default for f32).
const MAX_NMSE: f64 = 1e-7;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Builder<'a> {
    g: Graph,
    device: &'a Device,
    seed: u64,
}

impl Builder<'_> {
    fn param(&mut self, name: &str, dims: &[usize]) -> NodeId {
        self.seed += 1;
        let v =
            Value::from_f32(values(dims.iter().product(), self.seed), dims, self.device).unwrap();
        self.g.add_param(name, ParamKind::Weight, v).unwrap()
    }
    fn op(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> NodeId {
        self.g.add(name, op, inputs).unwrap()
    }
}

/// A small graph whose output is one node of `op`'s kind; `None` for the source kinds,
/// which every other case exercises.
fn case(op: &Op, device: &Device) -> Option<Graph> {
    let mut b = Builder {
        g: Graph::new(),
        device,
        seed: 0,
    };
    let tokens = b.g.add_tokens("tokens").unwrap();
    let f = |v: f32| F32Bits::new(v);
    let x = b.param("x", &[5, 8]);
    let out = match op {
        Op::Tokens | Op::Param(_) => return None,
        Op::Embedding => {
            let table = b.param("table", &[16, 8]);
            b.op("out", Op::Embedding, &[table, tokens])
        }
        Op::MatMul => {
            let w = b.param("w", &[6, 8]);
            b.op("out", Op::MatMul, &[x, w])
        }
        Op::RmsNorm { .. } => {
            let w = b.param("w", &[8]);
            b.op("out", Op::RmsNorm { eps: f(1e-5) }, &[x, w])
        }
        Op::Add | Op::Mul => {
            let y = b.param("y", &[5, 8]);
            let row = b.param("row", &[8]);
            let t = b.op("full", op.clone(), &[x, y]);
            b.op("out", op.clone(), &[t, row])
        }
        Op::Scale { .. } => b.op("out", Op::Scale { factor: f(-1.5) }, &[x]),
        Op::AddScalar { .. } => b.op("out", Op::AddScalar { value: f(0.75) }, &[x]),
        Op::Silu => b.op("out", Op::Silu, &[x]),
        Op::SwiGlu => b.op("out", Op::SwiGlu, &[x]),
        Op::GeluTanh => b.op("out", Op::GeluTanh, &[x]),
        Op::Gelu => b.op("out", Op::Gelu, &[x]),
        Op::LayerNorm { .. } => {
            let w = b.param("w", &[8]);
            let bias = b.param("bias", &[8]);
            b.op("out", Op::LayerNorm { eps: f(1e-12) }, &[x, w, bias])
        }
        Op::PositionEmbedding => {
            let table = b.param("positions", &[16, 8]);
            b.op("out", Op::PositionEmbedding, &[table])
        }
        Op::EncoderAttention { .. } => {
            // Token-driven: 3 heads of 8 over the step's own rows.
            let table = b.param("table", &[16, 24]);
            let e = b.op("e", Op::Embedding, &[table, tokens]); // [seq, 24]
            let wk = b.param("wk", &[24, 24]);
            let wv = b.param("wv", &[24, 24]);
            let k = b.op("k", Op::MatMul, &[e, wk]);
            let v = b.op("v", Op::MatMul, &[e, wv]);
            let attn = Op::EncoderAttention {
                n_heads: 3,
                head_dim: 8,
                scale: f(0.35),
            };
            b.op("out", attn, &[e, k, v])
        }
        Op::Cos => b.op("out", Op::Cos, &[x]),
        Op::Sin => b.op("out", Op::Sin, &[x]),
        Op::Slice { .. } => b.op(
            "out",
            Op::Slice {
                axis: 1,
                start: 2,
                len: 3,
            },
            &[x],
        ),
        Op::Concat { .. } => {
            let y = b.param("y", &[5, 3]);
            let z = b.param("z", &[2, 11]);
            let c = b.op("c1", Op::Concat { axis: 1 }, &[x, y]);
            b.op("out", Op::Concat { axis: 0 }, &[c, z])
        }
        Op::RopeAngles { .. } | Op::Rope { .. } | Op::KvAppend { .. } | Op::Attention { .. } => {
            // Token-driven, so they run at moving positions with a cache.
            let table = b.param("table", &[16, 24]);
            let e = b.op("e", Op::Embedding, &[table, tokens]); // [seq, 24]
                                                                // Per-frequency factors of at least 1, as Llama 3.1's are.
            let raw = b.param("raw_freqs", &[4]);
            let squared = b.op("squared_freqs", Op::Mul, &[raw, raw]);
            let freqs = b.op("freqs", Op::AddScalar { value: f(1.0) }, &[squared]);
            let angles = b.op(
                "angles",
                Op::RopeAngles {
                    head_dim: 8,
                    theta: f(10_000.0),
                    scaling: RopeScaling::Factors,
                    max_positions: 32,
                },
                &[freqs],
            );
            if matches!(op, Op::RopeAngles { .. }) {
                b.op("out", Op::Scale { factor: f(1.0) }, &[angles])
            } else {
                let cos = b.op("cos", Op::Cos, &[angles]);
                let sin = b.op("sin", Op::Sin, &[angles]);
                let q = b.op("q", Op::Rope { head_dim: 8 }, &[e, cos, sin]); // 3 heads of 8
                if matches!(op, Op::Rope { .. }) {
                    q
                } else {
                    let kv = b.op(
                        "kv",
                        Op::Slice {
                            axis: 1,
                            start: 0,
                            len: 8,
                        },
                        &[e],
                    ); // 1 kv head
                    let window =
                        if let Op::KvAppend { window, .. } | Op::Attention { window, .. } = op {
                            *window
                        } else {
                            None
                        };
                    let k = b.op(
                        "k",
                        Op::KvAppend {
                            layer: 0,
                            kind: KvKind::Key,
                            window,
                        },
                        &[kv],
                    );
                    let v = b.op(
                        "v",
                        Op::KvAppend {
                            layer: 0,
                            kind: KvKind::Value,
                            window,
                        },
                        &[kv],
                    );
                    if matches!(op, Op::KvAppend { .. }) {
                        v
                    } else {
                        let attn = Op::Attention {
                            n_heads: 3,
                            n_kv_heads: 1,
                            head_dim: 8,
                            scale: f(0.35),
                            window,
                        };
                        b.op("out", attn, &[q, k, v])
                    }
                }
            }
        }
    };
    b.g.set_outputs(vec![out]);
    Some(b.g)
}

/// Prefill 6 tokens, then decode 3: the op's output at every step. An encoder sees
/// each input whole, so its steps are inputs of their own (a fresh cache each).
fn run(g: Graph, device: &Device) -> Vec<Vec<f32>> {
    let encoder = g
        .nodes()
        .iter()
        .any(|n| matches!(n.op, Op::EncoderAttention { .. }));
    let program = Program::new(g, device.clone()).unwrap();
    let mut cache = program.new_cache(16).unwrap();
    let steps: [&[u32]; 4] = [&[3, 1, 4, 1, 5, 9], &[2], &[6], &[5]];
    steps
        .iter()
        .map(|ids| {
            if encoder {
                cache = program.new_cache(16).unwrap();
            }
            program.run(ids, &mut cache, &Taps::None).unwrap().outputs[0]
                .to_f32_vec()
                .unwrap()
        })
        .collect()
}

fn every_op_kind() -> Vec<Op> {
    let f = F32Bits::new;
    vec![
        Op::Embedding,
        Op::MatMul,
        Op::RmsNorm { eps: f(1e-5) },
        Op::Add,
        Op::Mul,
        Op::Scale { factor: f(1.0) },
        Op::AddScalar { value: f(1.0) },
        Op::Silu,
        Op::SwiGlu,
        Op::GeluTanh,
        Op::Gelu,
        Op::LayerNorm { eps: f(1e-12) },
        Op::PositionEmbedding,
        Op::EncoderAttention {
            n_heads: 3,
            head_dim: 8,
            scale: f(0.35),
        },
        Op::Slice {
            axis: 0,
            start: 0,
            len: 1,
        },
        Op::Concat { axis: 0 },
        Op::RopeAngles {
            head_dim: 8,
            theta: f(1.0),
            scaling: RopeScaling::None,
            max_positions: 1,
        },
        Op::Cos,
        Op::Sin,
        Op::Rope { head_dim: 8 },
        Op::KvAppend {
            layer: 0,
            kind: KvKind::Key,
            window: None,
        },
        Op::KvAppend {
            layer: 0,
            kind: KvKind::Key,
            window: Some(4),
        },
        Op::Attention {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 8,
            scale: f(1.0),
            window: None,
        },
        Op::Attention {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 8,
            scale: f(1.0),
            window: Some(4),
        },
    ]
}

/// Fails to compile when an op kind is added without a parity case above.
#[allow(dead_code)]
fn covered(op: &Op) {
    match op {
        Op::Tokens
        | Op::Param(_)
        | Op::Embedding
        | Op::MatMul
        | Op::RmsNorm { .. }
        | Op::Add
        | Op::Mul
        | Op::Scale { .. }
        | Op::AddScalar { .. }
        | Op::Silu
        | Op::SwiGlu
        | Op::GeluTanh
        | Op::Gelu
        | Op::LayerNorm { .. }
        | Op::PositionEmbedding
        | Op::EncoderAttention { .. }
        | Op::Slice { .. }
        | Op::Concat { .. }
        | Op::RopeAngles { .. }
        | Op::Cos
        | Op::Sin
        | Op::Rope { .. }
        | Op::KvAppend { .. }
        | Op::Attention { .. } => {}
    }
}

fn check_ops(name: &str, device: &Device) {
    let reference = ndarray();
    for op in every_op_kind() {
        let want = run(case(&op, &reference).unwrap(), &reference);
        let got = run(case(&op, device).unwrap(), device);
        for (step, (w, g)) in want.iter().zip(&got).enumerate() {
            let e = nmse(w, g);
            assert!(
                e <= MAX_NMSE,
                "{name}: {} (step {step}) NMSE {e:.2e} > {MAX_NMSE:e}",
                op.mnemonic()
            );
        }
    }
}

fn check_models(name: &str, device: &Device) {
    for model in TINY {
        let ids = reference(model).input_ids;
        let mut a = session(model, &ndarray(), &Pipeline::standard());
        let mut b = session(model, device, &Pipeline::standard());
        let (want, got) = (full_forward(&mut a, &ids), full_forward(&mut b, &ids));
        for (pos, (w, g)) in want.iter().zip(&got).enumerate() {
            let e = nmse(w, g);
            assert!(e <= MAX_NMSE, "{name} {model} position {pos}: NMSE {e:.2e}");
            assert!(max_abs_diff(w, g) <= 1e-4, "{name} {model} position {pos}");
        }
    }
}

#[test]
fn every_op_on_flex() {
    check_ops("flex", &flex());
}

#[test]
fn every_op_on_wgpu() {
    check_ops("wgpu", &wgpu());
}

#[test]
fn every_tiny_model_on_flex() {
    check_models("flex", &flex());
}

#[test]
fn every_tiny_model_on_wgpu() {
    check_models("wgpu", &wgpu());
}

#[test]
fn kv_equivalence_on_wgpu() {
    let device = wgpu();
    for model in ["llama3", "mistral"] {
        let ids = reference(model).input_ids;
        let mut s = session(model, &device, &Pipeline::standard());
        let full = full_forward(&mut s, &ids);
        for n in [1, 9] {
            s.reset();
            let first = s.prefill(&ids[..n]).unwrap();
            let mut worst = max_abs_diff(first.last(), &full[n - 1]);
            for (pos, &id) in ids.iter().enumerate().skip(n) {
                worst = worst.max(max_abs_diff(&s.decode(id).unwrap(), &full[pos]));
            }
            assert!(worst <= 1e-4, "{model} N={n}: {worst}");
        }
    }
}

/// A KV cache in f16 on the device (what engines on GPUs get by default) holds half
/// the bytes of an f32 one, every value it holds is an f16, and it gives what the
/// host's f16 cache gives: both store keys and values rounded, a step's own rows
/// included, and attention reads them widened. Prefill, then decode through the fused
/// attention kernel. Mistral's layers all have a sliding window, a ring the host keeps
/// in f32 device tensors: there the reference is the exact cache, within what
/// rounding to 2^-11 moves the logits.
#[test]
fn f16_kv_cache_on_wgpu_matches_the_host_f16_cache() {
    use llama::graph::KvType;
    use llama::runtime::Session;
    let device = wgpu();
    for model in ["llama3", "mistral"] {
        let ids = reference(model).input_ids;
        let open = |device: &Device, ty| {
            let program = session(model, device, &Pipeline::standard())
                .program()
                .clone();
            Session::with_cache_type(program, 64, ty).unwrap()
        };
        let wide = open(&device, KvType::F32);
        let mut half = open(&device, KvType::F16);
        assert_eq!(
            2 * half.cache_device_bytes(),
            wide.cache_device_bytes(),
            "{model}: the device cache is f16"
        );
        let mut host = open(&flex(), KvType::F16);
        let n = 5;
        let (a, b) = (
            half.prefill(&ids[..n]).unwrap(),
            host.prefill(&ids[..n]).unwrap(),
        );
        let mut worst = max_abs_diff(a.last(), b.last());
        let mut spread = b.last().iter().fold(0f32, |m, x| m.max(x.abs()));
        for &id in &ids[n..] {
            let (a, b) = (half.decode(id).unwrap(), host.decode(id).unwrap());
            worst = worst.max(max_abs_diff(&a, &b));
            spread = spread.max(b.iter().fold(0f32, |m, x| m.max(x.abs())));
        }
        let state = half.state().expect("state");
        for l in &state.cache.layers {
            for &x in l.keys.iter().chain(&l.values) {
                assert_eq!(
                    half::f16::from_f32(x).to_f32(),
                    x,
                    "{model}: {x} is not an f16"
                );
            }
        }
        let bound = if model == "mistral" {
            1e-2 * spread.max(1.0)
        } else {
            1e-3
        };
        assert!(
            worst <= bound,
            "{model}: f16 caches on wgpu and the host differ by {worst} (bound {bound})"
        );
    }
}
