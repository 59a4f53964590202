//! The engine as every front-end calls it: one compile policy per device, decided in
//! the runtime. ndarray stays the pure-burn reference; flex gets the host kernels.

use crate::common::*;
use llama::graph::{dump, KvType, PassContext, Pipeline, Program, Value};
use llama::runtime::{Backend, Context, Engine, Precision, RuntimeError, Session, SessionOptions};

fn engine(path: &std::path::Path, backend: Backend) -> Engine {
    let options = SessionOptions {
        backend,
        context: Context::Positions(32),
        ..SessionOptions::default()
    };
    Engine::load(path, &options).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn ndarray_runs_no_host_kernel() {
    for name in TINY {
        let e = engine(&fixture(name), Backend::Ndarray);
        assert!(!e.capabilities().host_kernels && !e.capabilities().host_kv);
        assert_eq!(e.program().host_nodes(), Vec::<&str>::new(), "{name}");
        let text = dump(e.program().graph());
        assert!(!text.contains("swiglu"), "{name}: a CPU-only pass ran");
        assert_eq!(e.passes(), ["fuse-matmul", "constant-fold", "dead-nodes"]);
        // Every session it opens keeps its cache as device tensors.
        let mut s = e.session().expect("session");
        s.prefill(&[1, 2, 3]).expect("prefill");
        assert_eq!(s.position(), 3);
    }
}

#[test]
fn flex_runs_the_host_kernels() {
    let e = engine(&fixture("llama3"), Backend::Flex);
    assert!(e.capabilities().host_kernels);
    let host = e.program().host_nodes();
    for op in ["attn_norm", "attn_q_rope", "attn_out", "ffn_norm"] {
        assert!(
            host.iter().any(|n| n.contains(op)),
            "no host node named *{op}*: {host:?}"
        );
    }
    assert!(dump(e.program().graph()).contains("swiglu"));
    assert_eq!(e.cache_type(), KvType::F16);
}

#[test]
fn ndarray_widens_gguf_blocks_to_f32() {
    let path = real_model_path();
    let blocks = |e: &Engine| {
        let g = e.program().graph();
        g.nodes()
            .iter()
            .filter(|n| matches!(g.param(&n.name), Some(Value::Quant(_))))
            .count()
    };
    let flex = engine(&path, Backend::Flex);
    assert!(blocks(&flex) > 0, "flex keeps the Q4_1 blocks");
    let reference = engine(&path, Backend::Ndarray);
    assert_eq!(
        blocks(&reference),
        0,
        "ndarray runs f32 weights through burn"
    );
    assert!(reference.program().host_nodes().is_empty());
}

#[test]
fn engine_sessions_are_what_the_policy_compiles_by_hand() {
    // On flex: the CPU pipeline and an f16 host cache, as the policy table says.
    let e = engine(&fixture("llama3"), Backend::Flex);
    let device = flex();
    let mut graph = load("llama3", &device).build_graph_for(32).expect("graph");
    Pipeline::standard_cpu(false)
        .run(
            &mut graph,
            &PassContext {
                device: device.clone(),
            },
        )
        .expect("passes");
    let program = Program::new(graph, device).expect("program");
    let mut by_hand = Session::with_cache_type(program, 32, KvType::F16).expect("session");
    let mut engined = e.session().expect("session");
    let ids = reference("llama3").input_ids;
    for step in [&ids[..5], &ids[5..6], &ids[6..7]] {
        let (a, b) = (
            by_hand.prefill(step).unwrap(),
            engined.prefill(step).unwrap(),
        );
        assert_eq!(a.data, b.data, "the same program gives the same logits");
    }
}

#[test]
fn exact_precision_keeps_an_exact_cache() {
    let options = SessionOptions {
        precision: Precision::F32,
        context: Context::Positions(16),
        ..SessionOptions::default()
    };
    let e = Engine::load(&fixture("llama3"), &options).expect("engine");
    assert_eq!(e.cache_type(), KvType::F32);
}

#[test]
fn a_context_past_the_model_is_refused_with_the_numbers() {
    let dir = fixture("llama3");
    let max = load("llama3", &flex()).config.max_position_embeddings;
    let options = SessionOptions {
        context: Context::Positions(max + 1),
        ..SessionOptions::default()
    };
    match Engine::load(&dir, &options) {
        Err(e @ RuntimeError::ContextSize { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&(max + 1).to_string()) && text.contains(&max.to_string()),
                "{text}"
            );
        }
        other => panic!("expected a context error, got {:?}", other.map(|_| ())),
    }
    let e = engine(&dir, Backend::Flex);
    assert!(
        e.session_with_context(33).is_err(),
        "a session past the engine's context"
    );
    assert_eq!(e.session_with_context(8).expect("session").context(), 8);
}
