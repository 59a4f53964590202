//! Each pass on a small hand-built graph: the outputs stay the same, and the dump
//! before and after is a snapshot.
use burn::tensor::Device;
use llama_graph::{
    dump, F32Bits, Graph, NodeId, Op, ParamKind, Pass, PassContext, Pipeline, Program, RopeScaling,
    Taps, Value,
};

fn values(n: usize, seed: u32) -> Vec<f32> {
    // A fixed, irregular sequence in [-1, 1].
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 2001) as f32
                / 1000.0
                - 1.0
        })
        .collect()
}

/// A graph of tokens -> `inp_embd` `[seq, 4]`, and that node.
fn embedded(device: &Device) -> (Graph, NodeId) {
    let mut g = Graph::new();
    let tokens = g.add_tokens("tokens").unwrap();
    let table = Value::from_f32(values(32, 1), &[8, 4], device).expect("value");
    let table = g
        .add_param("token_embd.weight", ParamKind::Weight, table)
        .unwrap();
    let x = g.add("inp_embd", Op::Embedding, &[table, tokens]).unwrap();
    (g, x)
}

/// tokens -> embedding -> two matmuls sharing the input; a RoPE table; a dead branch.
fn small_graph(device: &Device) -> Graph {
    let (mut g, x) = embedded(device);
    let p = |v: Vec<f32>, d: &[usize]| Value::from_f32(v, d, device).expect("value");
    let wa = g
        .add_param(
            "blk.0.ffn_gate.weight",
            ParamKind::Weight,
            p(values(12, 2), &[3, 4]),
        )
        .unwrap();
    let wb = g
        .add_param(
            "blk.0.ffn_up.weight",
            ParamKind::Weight,
            p(values(8, 3), &[2, 4]),
        )
        .unwrap();
    let a = g.add("blk.0.ffn_gate", Op::MatMul, &[x, wa]).unwrap();
    let b = g.add("blk.0.ffn_up", Op::MatMul, &[x, wb]).unwrap();
    let _dead = g.add("blk.0.unused", Op::Silu, &[x]).unwrap();
    let angles = g
        .add(
            "rope.angles",
            Op::RopeAngles {
                head_dim: 4,
                theta: F32Bits::new(10_000.0),
                scaling: RopeScaling::None,
                max_positions: 8,
            },
            &[],
        )
        .unwrap();
    let cos = g.add("rope.cos", Op::Cos, &[angles]).unwrap();
    let scaled = g
        .add(
            "rope.cos_scaled",
            Op::Scale {
                factor: F32Bits::new(0.5),
            },
            &[cos],
        )
        .unwrap();
    g.set_outputs(vec![a, b, scaled]);
    g
}

fn run(g: &Graph, device: &Device) -> Vec<Vec<f32>> {
    let program = Program::new(g.clone(), device.clone()).expect("program");
    let mut cache = program.new_cache(8).expect("cache");
    let out = program
        .run(&[3, 1, 4, 1, 5], &mut cache, &Taps::None)
        .expect("run");
    out.outputs
        .iter()
        .map(|v| v.to_f32_vec().expect("f32"))
        .collect()
}

fn check(pass: Box<dyn Pass>) {
    let device = Device::flex();
    check_on(pass, small_graph(&device), &device);
}

fn check_on(pass: Box<dyn Pass>, before: Graph, device: &Device) {
    let mut after = before.clone();
    let n = pass
        .run(
            &mut after,
            &PassContext {
                device: device.clone(),
            },
        )
        .expect("pass");
    assert!(n > 0, "{} rewrote nothing", pass.name());
    after.validate().expect("valid after the pass");
    assert_eq!(
        run(&before, device),
        run(&after, device),
        "{} changed the outputs",
        pass.name()
    );
    let text = format!(
        "--- before\n{}--- after {} ({n} rewrites)\n{}",
        dump(&before),
        pass.name(),
        dump(&after)
    );
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(format!("pass__{}", pass.name()), text);
    });
}

#[test]
fn dead_nodes() {
    check(Box::new(llama_graph::passes::DeadNodes));
}

#[test]
fn constant_fold() {
    check(Box::new(llama_graph::passes::ConstantFold));
}

#[test]
fn fuse_matmul() {
    check(Box::new(llama_graph::passes::FuseSiblingMatMuls));
}

/// A gated MLP over a fused gate/up matmul, three times: fusable with the product's
/// operands either way round, and with the gate also read elsewhere (left alone).
fn gated_mlp(device: &Device) -> Graph {
    let (mut g, x) = embedded(device);
    let p = |v: Vec<f32>, d: &[usize]| Value::from_f32(v, d, device).expect("value");
    let mut outs = Vec::new();
    for l in 0..3 {
        let w = g
            .add_param(
                &format!("blk.{l}.ffn_gate_up.weight"),
                ParamKind::Weight,
                p(values(24, 2 + l), &[6, 4]),
            )
            .unwrap();
        let gu = g
            .add(&format!("blk.{l}.ffn_gate_up"), Op::MatMul, &[x, w])
            .unwrap();
        let slice = |g: &mut Graph, name: &str, start| {
            g.add(
                &format!("blk.{l}.{name}"),
                Op::Slice {
                    axis: 1,
                    start,
                    len: 3,
                },
                &[gu],
            )
            .unwrap()
        };
        let gate = slice(&mut g, "ffn_gate", 0);
        let up = slice(&mut g, "ffn_up", 3);
        let act = g
            .add(&format!("blk.{l}.ffn_silu"), Op::Silu, &[gate])
            .unwrap();
        // The product with its operands either way round.
        let ins = if l == 0 { [act, up] } else { [up, act] };
        outs.push(g.add(&format!("blk.{l}.ffn_act"), Op::Mul, &ins).unwrap());
        if l == 2 {
            outs.push(gate);
        }
    }
    g.set_outputs(outs);
    g
}

#[test]
fn fuse_swiglu() {
    let device = Device::flex();
    check_on(
        Box::new(llama_graph::passes::FuseSwiGlu),
        gated_mlp(&device),
        &device,
    );
}

#[test]
fn shape_errors_name_the_node_and_both_shapes() {
    let device = Device::flex();
    let mut g = Graph::new();
    let x = g
        .add_param(
            "x",
            ParamKind::Weight,
            Value::from_f32(values(8, 1), &[2, 4], &device).unwrap(),
        )
        .unwrap();
    let w = g
        .add_param(
            "blk.3.attn_q.weight",
            ParamKind::Weight,
            Value::from_f32(values(15, 1), &[3, 5], &device).unwrap(),
        )
        .unwrap();
    let err = g
        .add("blk.3.attn_q", Op::MatMul, &[x, w])
        .unwrap_err()
        .to_string();
    assert!(err.contains("blk.3.attn_q"), "{err}");
    assert!(err.contains("[_, 4]") && err.contains("[3, 5]"), "{err}");
    let _ = Pipeline::standard();
}

#[test]
fn quantize_weights() {
    // Lossy by design: outputs stay within the int8 bound instead of equal.
    let device = Device::flex();
    let before = small_graph(&device);
    let mut after = before.clone();
    let pass = llama_graph::passes::QuantizeWeights;
    let n = pass
        .run(
            &mut after,
            &PassContext {
                device: device.clone(),
            },
        )
        .expect("pass");
    assert_eq!(n, 0, "no weight here is a whole number of 32-wide blocks");
    // A graph whose weights are: both matmuls quantize, the embedding table keeps f32.
    let mut g = Graph::new();
    let p = |v: Vec<f32>, d: &[usize]| Value::from_f32(v, d, &device).expect("value");
    let tokens = g.add_tokens("tokens").unwrap();
    let table = g
        .add_param(
            "token_embd.weight",
            ParamKind::Weight,
            p(values(8 * 64, 1), &[8, 64]),
        )
        .unwrap();
    let x = g.add("inp_embd", Op::Embedding, &[table, tokens]).unwrap();
    let w = g
        .add_param(
            "blk.0.ffn_up.weight",
            ParamKind::Weight,
            p(values(3 * 64, 2), &[3, 64]),
        )
        .unwrap();
    let a = g.add("blk.0.ffn_up", Op::MatMul, &[x, w]).unwrap();
    let logits = g.add("logits", Op::MatMul, &[x, table]).unwrap();
    g.set_outputs(vec![a, logits]);
    let mut q = g.clone();
    assert_eq!(
        pass.run(
            &mut q,
            &PassContext {
                device: device.clone()
            }
        )
        .unwrap(),
        2
    );
    q.validate().unwrap();
    let (want, got) = (run(&g, &device), run(&q, &device));
    // Int8 activations and weights: a few percent of the output's scale (the kernel's
    // exact bound is tested in tests/q8.rs).
    for (w, g) in want.iter().zip(&got) {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in w.iter().zip(g) {
            assert!((a - b).abs() <= 0.05 * scale, "{a} vs {b} (scale {scale})");
        }
    }
    let text = format!(
        "--- before\n{}--- after quantize-weights\n{}",
        dump(&g),
        dump(&q)
    );
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!("pass__quantize-weights", text);
    });
}
