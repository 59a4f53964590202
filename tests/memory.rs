//! What the process's resident memory shows: a thousand sequences come and go through
//! one scheduler and leave nothing behind; model files that claim more than they hold
//! are refused without allocating what they claim; a server that takes ten thousand
//! hostile requests comes back to the memory it had; a model's block weights on the GPU
//! take about the file's size of device memory. A binary of its own, its tests one
//! at a time, so that the memory each reads is its own.
#[path = "it/common/mod.rs"]
mod common;

use crate::common::gguf_writer::gguf_string;
use crate::common::*;

/// Ten thousand hostile requests against a running server.
#[path = "memory/hostile.rs"]
mod hostile;
use llama::graph::{KvType, Pipeline, Program};
use llama::runtime::{BatchOptions, Event, Scheduler};

/// Runs the scheduler to the end; the number of sequences that finished.
fn drain(s: &mut Scheduler<'_>) -> usize {
    let mut done = 0;
    s.run(|e| match e {
        Event::Done { .. } => done += 1,
        Event::Failed { seq, error } => panic!("sequence {seq} failed: {error}"),
        _ => {}
    });
    done
}

/// One test at a time in this binary.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_thousand_sequences_come_and_go_without_leaking() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let device = flex();
    let p = Program::new(
        graph("llama3", &device, &Pipeline::standard()),
        device.clone(),
    )
    .expect("program");
    let opts = BatchOptions {
        kv_budget: 200,
        max_sequences: 16,
        ..BatchOptions::default()
    };
    let mut s = Scheduler::for_program(&p, 64, KvType::F32, opts).expect("scheduler");
    let round = |s: &mut Scheduler<'_>, from: u32| {
        for i in from..from + 100 {
            s.submit(ids(3 + (i as usize % 20), i), greedy(1 + i as usize % 5))
                .expect("submit");
        }
        assert_eq!(drain(s), 100);
        assert!(s.kv_used() <= 200);
    };
    round(&mut s, 0);
    let before = rss_kib();
    for r in 1..10 {
        round(&mut s, r * 100);
    }
    let grown = rss_kib().saturating_sub(before);
    assert_eq!(s.running() + s.waiting(), 0);
    assert_eq!(s.kv_used(), s.prefix_positions());
    s.clear_prefixes();
    assert_eq!(s.kv_used(), 0);
    assert!(
        grown < 32 * 1024,
        "resident memory grew {grown} KiB over 900 sequences"
    );
}

/// Peak resident memory since the last reset, in KiB.
fn peak_rss_kib() -> u64 {
    status_kib("VmHWM").expect("VmHWM in /proc/self/status")
}

/// A GGUF v3 header claiming `n_tensors` tensors and `n_kv` metadata pairs, then `rest`.
fn header(n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(rest);
    b.extend([0u8; 64]);
    b
}

/// Files whose header claims 2^60 tensors, metadata pairs, string bytes or array items,
/// or a tensor of 2^62 bytes, are refused by reading the claim against the bytes
/// present: within 10 ms, and the process's peak memory grows by under 10 MiB.
#[test]
fn files_that_claim_more_than_they_hold_are_refused_at_once() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    const HUGE: u64 = 1 << 60;
    let key_claims = |tail: &[u8]| {
        let mut b = gguf_string("general.name");
        b.extend(tail);
        b
    };
    let mut array = key_claims(&9u32.to_le_bytes());
    array.extend(0u32.to_le_bytes()); // u8 items
    array.extend(HUGE.to_le_bytes());
    let mut strings = key_claims(&9u32.to_le_bytes());
    strings.extend(8u32.to_le_bytes()); // string items
    strings.extend(HUGE.to_le_bytes());
    let mut string = key_claims(&8u32.to_le_bytes());
    string.extend(HUGE.to_le_bytes());
    let mut tensor = gguf_string("t");
    tensor.extend(2u32.to_le_bytes());
    tensor.extend((1u64 << 30).to_le_bytes());
    tensor.extend((1u64 << 30).to_le_bytes()); // 2^60 f32 values: 2^62 bytes
    tensor.extend(0u32.to_le_bytes());
    tensor.extend(0u64.to_le_bytes());
    let cases = [
        ("tensors", header(HUGE, 0, &[]), "claims"),
        ("metadata pairs", header(0, HUGE, &[]), "claims"),
        ("key bytes", header(0, 1, &HUGE.to_le_bytes()), "claims"),
        ("string bytes", header(0, 1, &string), "claims"),
        ("array items", header(0, 1, &array), "claims"),
        ("string items", header(0, 1, &strings), "claims"),
        ("tensor bytes", header(1, 0, &tensor), "past the end"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, bytes, says) in cases {
        let path = dir.path().join("hostile.gguf");
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
        let before = peak_rss_kib();
        // The fastest of five tries: the time the refusal takes, not the time another
        // process (or a device thread of an earlier test) held the core.
        let mut took = std::time::Duration::MAX;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            let err = llama::models::GgufFile::open(&path)
                .expect_err(what)
                .to_string();
            took = took.min(start.elapsed());
            assert!(err.contains(says), "{what}: {err}");
        }
        let grown = peak_rss_kib().saturating_sub(before);
        assert!(
            took < std::time::Duration::from_millis(10),
            "{what}: refused after {took:?}"
        );
        assert!(grown < 10 * 1024, "{what}: peak memory grew {grown} KiB");
    }
}

/// The engine as `llama generate --backend wgpu` builds it: SmolLM2 Q4_1's block
/// weights stay in their blocks on the device. Device memory (wgpu's own pools) stays
/// within 1.3x the file's tensor bytes plus the KV cache (the f32 weights alone would
/// be about 5x), the KV cache in f16; perplexity matches transformers as the widened
/// path does; greedy tokens (picked on the device) equal the CPU's up to a near-tie. The CPU reference is its exact path (the
/// same weights widened to f32): the CPU block kernels round activations to 8 bits, as
/// llama.cpp's do, and the GPU kernels multiply f32 activations. Here, not in `it`:
/// the device's pools are the process's, and other tests would allocate beside it.
#[test]
fn block_weights_stay_in_blocks_on_wgpu() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    use llama::models::gguf::GgufFile;
    use llama::runtime::generate_greedy;
    use llama::runtime::{Backend, Context, Engine, Precision, SessionOptions};

    let path = real_model_path();
    let context = 640;
    let load = |backend, precision| {
        let options = SessionOptions {
            backend,
            precision,
            context: Context::Positions(context),
            ..SessionOptions::default()
        };
        Engine::load(&path, &options).unwrap_or_else(|e| panic!("{e}"))
    };
    let gpu = load(Backend::Wgpu, Precision::Native);
    assert!(
        gpu.passes().contains(&"upload-blocks"),
        "passes: {:?}",
        gpu.passes()
    );
    let mut s = gpu.session().expect("session");

    let file = GgufFile::open(&path).expect("gguf");
    let tensor_bytes: usize = file.tensors.iter().map(|t| t.len).sum();
    let c = &gpu.model().config;
    // Keys and values in f16 on the device, the engine's default on GPUs.
    let kv_bytes = 2 * c.num_hidden_layers * context * c.n_kv_heads() * c.head_dim() * 2;
    assert_eq!(
        s.cache_device_bytes(),
        kv_bytes,
        "an f16 KV cache on the device"
    );
    let bound = 1.3 * tensor_bytes as f64 + kv_bytes as f64;
    let usage = || {
        gpu.device()
            .memory_pool_usage()
            .expect("wgpu reports its pools")
    };
    let loaded = usage();
    eprintln!(
        "device memory after loading: {} reserved, {} in use; file tensors {tensor_bytes}, KV {kv_bytes}",
        loaded.bytes_reserved, loaded.bytes_in_use
    );
    assert!(
        (loaded.bytes_reserved as f64) <= bound,
        "after loading: {} bytes reserved; file tensors {tensor_bytes}, KV {kv_bytes}",
        loaded.bytes_reserved
    );

    let r = common::smollm2::perplexity();
    r.check(&mut s, 5e-3, "wgpu with device blocks");
    let after = usage();
    eprintln!(
        "device memory after a prefill: {} reserved, {} in use",
        after.bytes_reserved, after.bytes_in_use
    );
    assert!(
        (after.bytes_in_use as f64) <= bound,
        "after a prefill: {} bytes in use; file tensors {tensor_bytes}, KV {kv_bytes}",
        after.bytes_in_use
    );

    // Kernels per decode token: each op between the matmuls fused (RMSNorm, RoPE and
    // the cache writes one kernel each, the activation and residual adds one each),
    // each matmul one launch. Per layer: 4 matmuls, 2 norms, 2 rotations, 2 cache
    // writes, attention, SiLU·up and 2 residual adds make 14; 16 leaves room for a
    // copy. Fusion falling apart (single-op kernels for each add and multiply) shows
    // here as two or three times that.
    s.reset();
    let prompt = &common::smollm2::greedy().prompts[0].input_ids;
    let next = s.prefill_argmax(prompt).expect("prefill");
    let (picked, launches) = llama::graph::gpu::count_launches(|| s.prefill_argmax(&[next]));
    picked.expect("decode");
    let layers = gpu.model().config.num_hidden_layers;
    eprintln!("kernel launches per decode token: {launches:?}");
    assert_eq!(
        launches.matching("BlockGemv"),
        4 * layers + 1,
        "one launch per block matmul (QKV, O, gate-up, down; the head): {launches:?}"
    );
    assert!(
        launches.total() <= 16 * layers + 8,
        "{} launches for one decode token of {layers} layers: {launches:?}",
        launches.total()
    );

    let cpu = load(Backend::Flex, Precision::F32);
    let mut c = cpu.session().expect("session");
    const TOKENS: usize = 8;
    for p in &common::smollm2::greedy().prompts {
        s.reset();
        c.reset();
        let got = generate_greedy(&mut s, &p.input_ids, TOKENS, &[], |_| {}).unwrap();
        let want = generate_greedy(&mut c, &p.input_ids, TOKENS, &[], |_| {}).unwrap();
        if let Some(i) = (0..TOKENS).find(|&i| got.ids[i] != want.ids[i]) {
            // A difference is allowed only where the CPU's top two are within 0.05.
            c.reset();
            let mut prefix = p.input_ids.clone();
            prefix.extend_from_slice(&want.ids[..i]);
            let row = c.prefill(&prefix).unwrap().last().to_vec();
            assert!(
                margin(&row) <= 0.05,
                "{}: token {i}: {} on wgpu, {} on the CPU (margin {})",
                p.name,
                got.ids[i],
                want.ids[i],
                margin(&row)
            );
        }
    }
}
