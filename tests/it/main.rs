//! The integration tests, one module per area, linked into one binary: every test
//! binary links all of burn, so one binary instead of twenty keeps the test build's
//! time and disk in check. Run one area with `cargo test --test it tokenizer::`.
//! Tests that read the process's resident memory live in binaries of their own
//! (`tests/memory.rs`, `tests/serve.rs`), where no other test allocates beside them.
mod common;

mod agent;
mod backend_parity;
mod batching;
mod cli;
mod cli_docs;
mod compare;
mod embeddings;
mod engine;
mod fuzz_replay;
mod generation;
mod gguf_format;
mod gpu_blocks;
mod gpu_fused;
mod kv_quant;
mod model_variants;
mod non_finite;
mod passes_on_models;
mod prompt_cache;
mod rag;
mod readme;
mod real_families;
mod real_model;
mod safetensors_loading;
mod serve_cli;
mod serve_dialects;
mod serve_models;
mod service;
mod speculative;
mod structured;
mod tiny_models;
mod tokenizer;
mod wgpu_real_model;
