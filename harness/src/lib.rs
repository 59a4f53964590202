//! Entry points that take untrusted bytes, one per fuzz target.
//!
//! Each `fn(&[u8])` feeds its input to one of the parsers or front doors a stranger's
//! file or request reaches: a GGUF model, a safetensors checkpoint directory, a
//! tokenizer, a chat template, the sampler's settings, and `llama serve`'s routes. Bad
//! input must come back as an error; a panic, a hang or an allocation the input merely
//! claims is a bug. The fuzz targets in `fuzz/` call these under libFuzzer, and the
//! integration tests replay every input kept in `tests/fixtures/fuzz/` through them on
//! stable Rust, so a crash found once stays fixed.
//!
//! Inputs made of several files or fields are split with [`SEPARATOR`], which keeps the
//! seeds readable and lets the fuzzer's mutations move the boundaries.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod server;
mod text;

pub use server::{server_request, ROUTES};
pub use text::{chat_template, sampler, tokenizer};

use llama_models::ModelSource;
use llama_runtime::{Backend, Context, Engine, SessionOptions};

/// What separates the parts of a multi-part input.
pub const SEPARATOR: &[u8] = b"\n--8<--\n";

/// An entry point: takes the input's bytes, says whether it went all the way through.
pub type Target = fn(&[u8]) -> bool;

/// Each entry point returns whether the input went all the way through (loaded and
/// ran, rendered, answered 2xx): the seeds must, so the fuzzer starts from inputs that
/// reach the deep code.
///
/// The fuzz targets, by name: what `scripts/fuzz.sh` runs and the replay test reads
/// `tests/fixtures/fuzz/<name>/` for.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("tokenizer", tokenizer),
    ("chat_template", chat_template),
    ("sampler", sampler),
    ("server", server_request),
];

/// Splits `data` at every [`SEPARATOR`].
pub fn parts(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(at) = find(rest, SEPARATOR) {
        out.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    out.push(rest);
    out
}

/// Joins parts with [`SEPARATOR`]: the inverse of [`parts`], for making seeds.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEPARATOR)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A directory of this process's own for the files an input is written to (the
/// loaders read paths, as `llama` does).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("llama-harness-{}", std::process::id()));
        // A failure here is the machine's, not the input's: nothing can run without it.
        std::fs::create_dir_all(&dir).expect("a scratch directory for the harness");
        dir
    })
}

/// A directory of the calling thread's own under [`scratch`], so that entry points
/// called from several threads at once (the test harness runs tests in parallel)
/// never read each other's files.
fn thread_scratch() -> PathBuf {
    thread_local! {
        static DIR: PathBuf = {
            let id = format!("{:?}", std::thread::current().id());
            let dir = scratch().join(id.replace(|c: char| !c.is_ascii_alphanumeric(), ""));
            std::fs::create_dir_all(&dir).expect("a scratch directory for the thread");
            dir
        };
    }
    DIR.with(|d| d.clone())
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("writing the harness's scratch file");
}

/// The engine settings every model input loads with: one thread on the CPU, a short
/// context, every weight checked for NaN and infinity.
fn options() -> SessionOptions {
    SessionOptions {
        backend: Backend::Flex,
        threads: Some(1),
        context: Context::Default,
        check_tensors: true,
        ..SessionOptions::default()
    }
}

/// Positions the session that runs a loaded model holds.
const RUN_POSITIONS: usize = 8;

/// Loads the model at `path` as `llama` does and, if it loads, runs what a user's first
/// commands would: `inspect`'s inventory, the tokenizer, the chat template, and one
/// prompt through a session (non-finite logits must come back as an error).
fn load_and_run(path: &Path) -> bool {
    if let Ok(source) = ModelSource::open(path) {
        let _ = source.inventory();
        let _ = llama_runtime::Tokenizer::for_source(&source);
        let _ = llama_runtime::ChatTemplate::for_source(&source);
    }
    let Ok(engine) = Engine::load(path, &options()) else {
        return false;
    };
    if let Ok(tokenizer) = engine.tokenizer() {
        let _ = tokenizer.encode("Hello, world! 123 héllo 🦙");
    }
    if let Ok(template) = engine.chat_template() {
        let _ = template.render(&[llama_runtime::Message::new("user", "Hi")], true);
    }
    let context = engine.context().min(RUN_POSITIONS);
    let vocab = engine.model().config.vocab_size;
    if engine.is_encoder() {
        return llama_runtime::Embedder::new(&engine, None)
            .is_ok_and(|e| e.embed_texts(&["a text"]).is_ok());
    }
    let Ok(mut session) = engine.session_with_context(context) else {
        return false;
    };
    let ids: Vec<u32> = (0..context.min(3) as u32)
        .map(|i| i % vocab.max(1) as u32)
        .collect();
    match session.prefill(&ids) {
        Ok(logits) => {
            let last = logits.last();
            assert_eq!(
                last.len(),
                vocab,
                "a logits row is as wide as the vocabulary"
            );
            true
        }
        Err(_) => false,
    }
}

/// A GGUF file: header, metadata, tensor index, then loading and running it.
pub fn gguf(data: &[u8]) -> bool {
    let path = thread_scratch().join("model.gguf");
    write(&path, data);
    load_and_run(&path)
}

/// The files of a safetensors checkpoint directory, in this order: `config.json`,
/// `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
/// `generation_config.json` (a missing part is a missing file), loaded and run.
pub fn safetensors(data: &[u8]) -> bool {
    const FILES: [&str; 5] = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ];
    let dir = thread_scratch().join("checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the harness's checkpoint directory");
    for (name, bytes) in FILES.iter().zip(parts(data)) {
        write(&dir.join(name), bytes);
    }
    load_and_run(&dir)
}
