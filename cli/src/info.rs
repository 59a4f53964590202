//! Commands that read a model file without running it: `inspect`, `tokenize`,
//! `convert`; and `devices`.
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use llama_models::ModelSource;
use llama_runtime::{ChatTemplate, Tokenizer};

#[derive(Args)]
pub struct TokenizeArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    #[arg(long, short = 't')]
    text: String,
    /// Also print the token strings, as a second JSON array.
    #[arg(long)]
    tokens: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long, short = 'm')]
    model: PathBuf,
}

/// Element type of converted weights.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConvertDtype {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The .gguf file to convert.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Output directory (created; existing files in it are replaced).
    #[arg(long, short = 'o')]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ConvertDtype,
}

pub fn run_tokenize(args: TokenizeArgs) -> Result<()> {
    // Only the vocabulary is needed: no weights are loaded.
    let tokenizer = Tokenizer::for_source(&ModelSource::open(&args.model)?)?;
    let ids = tokenizer.encode(&args.text)?;
    println!("{}", serde_json::to_string(&ids)?);
    if args.tokens {
        let tokens: Vec<String> = ids
            .iter()
            .map(|&id| tokenizer.token(id).unwrap_or_default())
            .collect();
        println!("{}", serde_json::to_string(&tokens)?);
    }
    Ok(())
}

pub fn human_bytes(n: usize) -> String {
    let n = n as f64;
    match n {
        n if n >= 1024.0 * 1024.0 * 1024.0 => format!("{:.2} GiB", n / (1024.0 * 1024.0 * 1024.0)),
        n if n >= 1024.0 * 1024.0 => format!("{:.1} MiB", n / (1024.0 * 1024.0)),
        n => format!("{:.1} KiB", n / 1024.0),
    }
}

pub fn run_inspect(args: InspectArgs) -> Result<()> {
    let source = ModelSource::open(&args.model)?;
    let inv = source.inventory()?;
    let c = &inv.config;
    let format = match &source {
        ModelSource::Gguf(f) => format!("GGUF v{}", f.version),
        ModelSource::HfDir(_) => "HF directory".to_string(),
    };
    println!("model: {} ({format})", args.model.display());
    println!("architecture: {}", inv.arch);
    println!(
        "layers: {} | d_model: {} | heads: {} (kv {}) | head_dim: {} | ffn: {} | vocab: {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.n_kv_heads(),
        c.head_dim(),
        c.intermediate_size,
        c.vocab_size
    );
    let rope = c.rope();
    println!(
        "context length: {} | rope theta: {} | rope scaling: {} | norm eps: {:e} | tied embeddings: {}",
        c.max_position_embeddings,
        rope.rope_theta.unwrap_or(10_000.0),
        rope.rope_type.as_deref().unwrap_or("none"),
        c.rms_norm_eps,
        c.tie_word_embeddings
    );
    if let Some(w) = c
        .sliding_window
        .filter(|_| (0..c.num_hidden_layers).any(|l| c.sliding_window_of(l).is_some()))
    {
        println!("sliding window: {w}");
    }
    let differences = inv.arch.differences_from_llama(c);
    if !differences.is_empty() {
        println!("differs from Llama in:");
        for d in &differences {
            println!("  - {d}");
        }
    }
    let mut by_type: std::collections::BTreeMap<&str, (usize, usize)> =
        std::collections::BTreeMap::new();
    let (mut params, mut bytes) = (0usize, 0usize);
    for t in &inv.tensors {
        let e = by_type.entry(&t.dtype).or_default();
        e.0 += 1;
        e.1 += t.bytes;
        params += t.shape.iter().product::<usize>();
        bytes += t.bytes;
    }
    let types: Vec<String> = by_type
        .iter()
        .map(|(ty, (n, b))| format!("{ty}: {n} ({})", human_bytes(*b)))
        .collect();
    println!("tensors: {} | {}", inv.tensors.len(), types.join(", "));
    println!(
        "parameters: {:.1}M | tensor bytes: {}",
        params as f64 / 1e6,
        human_bytes(bytes)
    );
    let tokenizer = Tokenizer::for_source(&source).ok();
    let name = |id: Option<u32>| match (id, &tokenizer) {
        (Some(id), Some(t)) => format!("{id} {:?}", t.token(id).unwrap_or_default()),
        (Some(id), None) => id.to_string(),
        (None, _) => "none".into(),
    };
    let eos: Vec<String> = match &source {
        ModelSource::Gguf(f) => ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| {
                f.get(&format!("tokenizer.ggml.{k}_token_id"))
                    .and_then(|v| v.as_u64())
            })
            .map(|id| name(Some(id as u32)))
            .collect(),
        ModelSource::HfDir(_) => c
            .eos_token_ids()
            .into_iter()
            .map(|id| name(Some(id)))
            .collect(),
    };
    println!(
        "special tokens: bos {} | eos {}",
        name(c.bos_token_id),
        eos.join(", ")
    );
    match ChatTemplate::for_source(&source)? {
        Some(t) => println!("chat template: {}", t.source),
        None => println!("chat template: none"),
    }
    Ok(())
}

pub fn run_convert(args: ConvertArgs) -> Result<()> {
    use llama_models::convert::Dtype;
    let ModelSource::Gguf(file) = ModelSource::open(&args.model)? else {
        bail!("{}: not a GGUF file", args.model.display());
    };
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let dtype = match args.dtype {
        ConvertDtype::F32 => Dtype::F32,
        ConvertDtype::Bf16 => Dtype::BF16,
        ConvertDtype::F16 => Dtype::F16,
    };
    let written =
        llama_models::convert::gguf_to_hf(&file, &args.out, dtype, &tokenizer.to_json()?)?;
    eprintln!("wrote {} tensors to {}", written, args.out.display());
    Ok(())
}

pub fn run_devices() -> Result<()> {
    for (i, line) in llama_runtime::device::list_gpus()?.iter().enumerate() {
        println!("{i}: {line}");
    }
    Ok(())
}
