//! Tokenizers, chat templates and sampler settings from untrusted bytes.
use llama_models::GgufFile;
use llama_runtime::{ChatTemplate, Sampler, SamplerConfig, Tokenizer};

use crate::{parts, thread_scratch, write};

/// A tokenizer and the text it is given. Parts: the tokenizer (a GGUF file whose
/// `tokenizer.ggml.*` metadata the builder reads, or a `tokenizer.json` when the bytes
/// do not start with the GGUF magic), the text to encode, and bytes read as token ids
/// to decode and stream.
pub fn tokenizer(data: &[u8]) -> bool {
    let p = parts(data);
    let source = p[0];
    let text = String::from_utf8_lossy(p.get(1).copied().unwrap_or(b"Hello world"));
    let ids: Vec<u32> = p
        .get(2)
        .copied()
        .unwrap_or(&[0, 1, 2, 3])
        .chunks(2)
        .map(|c| u32::from(c[0]) | u32::from(*c.get(1).unwrap_or(&0)) << 8)
        .collect();
    let tokenizer = if source.starts_with(b"GGUF") {
        let path = thread_scratch().join("tokenizer.gguf");
        write(&path, source);
        let Ok(file) = GgufFile::open(&path) else {
            return false;
        };
        Tokenizer::from_gguf(&file)
    } else {
        let path = thread_scratch().join("tokenizer.json");
        write(&path, source);
        Tokenizer::from_file(&path)
    };
    let Ok(tokenizer) = tokenizer else {
        return false;
    };
    let encoded = tokenizer.encode(&text);
    if let Ok(ids) = &encoded {
        let _ = tokenizer.decode(ids);
    }
    let _ = tokenizer.encode_plain(&text);
    let _ = tokenizer.encode_limited(&text, 16);
    let _ = tokenizer.token_spans(&text);
    let _ = tokenizer.leading_special();
    let _ = tokenizer.decode(&ids);
    let _ = tokenizer.decode_with_special(&ids);
    let mut stream = tokenizer.stream();
    for &id in &ids {
        let _ = tokenizer.token(id);
        if stream.push(id).is_err() {
            break;
        }
    }
    let _ = stream.finish();
    encoded.is_ok()
}

/// A chat template rendered with messages and tools, all untrusted. Parts: the
/// template, the messages (JSON; anything but a list is wrapped as one message's
/// content), the tools (JSON), and the BOS and EOS texts. The first byte of the
/// messages part being odd asks for the generation prompt.
pub fn chat_template(data: &[u8]) -> bool {
    let p = parts(data);
    let text = |i: usize| String::from_utf8_lossy(p.get(i).copied().unwrap_or(b"")).into_owned();
    let template = ChatTemplate {
        source: "fuzz".into(),
        template: text(0),
        bos_token: text(3),
        eos_token: text(4),
    };
    let raw = p.get(1).copied().unwrap_or(b"[]");
    let add_generation_prompt = raw.first().is_some_and(|b| b % 2 == 1);
    let messages = match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(v @ serde_json::Value::Array(_)) => v,
        Ok(v) => serde_json::json!([{ "role": "user", "content": v }]),
        Err(_) => serde_json::json!([{ "role": "user", "content": text(1) }]),
    };
    let tools = p
        .get(2)
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(t).ok());
    template
        .render_with(&messages, tools.as_ref(), add_generation_prompt)
        .is_ok()
}

/// Sampler settings as a request could set them, and logits to sample from. The bytes
/// are read in order as: temperature, top-p, min-p, repeat penalty, presence and
/// frequency penalties (f32 each), top-k, repeat window, seed, a logit bias table
/// (id, bias pairs), then logits. Settings that [`SamplerConfig::validate`] refuses are
/// never sampled with, as in the engine; logits are finite, as the engine checks them
/// before sampling.
pub fn sampler(data: &[u8]) -> bool {
    let mut r = Reader(data);
    let mut config = SamplerConfig {
        temperature: r.f32(),
        top_p: r.option_f32(),
        min_p: r.option_f32(),
        repeat_penalty: r.f32(),
        presence_penalty: r.f32(),
        frequency_penalty: r.f32(),
        top_k: Some(r.u16() as usize).filter(|&k| k != u16::MAX as usize),
        repeat_last_n: r.u16() as usize,
        seed: r.u64(),
        logit_bias: Vec::new(),
    };
    for _ in 0..r.byte() % 8 {
        config.logit_bias.push((u32::from(r.u16()), r.f32()));
    }
    let mut logits = Vec::new();
    while logits.len() < 4096 && !r.0.is_empty() {
        let v = r.f32();
        logits.push(if v.is_finite() { v } else { 0.0 });
    }
    if logits.is_empty() {
        logits.push(0.0);
    }
    if config.validate().is_err() {
        return false;
    }
    let history: Vec<u32> = (0..logits.len().min(32) as u32).collect();
    let mut sampler = Sampler::new(config);
    let dist = sampler.distribution(&logits, &history);
    let mass: f64 = dist.iter().map(|&(_, p)| p).sum();
    assert!((mass - 1.0).abs() < 1e-3, "a distribution of mass {mass}");
    let id = sampler.sample(&logits, &history);
    assert!(
        (id as usize) < logits.len(),
        "sampled id {id} of {}",
        logits.len()
    );
    true
}

/// Reads fixed-width values off the front of the input, zeros once it runs out.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn byte(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.take())
    }
    fn option_f32(&mut self) -> Option<f32> {
        let v = self.f32();
        (v != 0.0).then_some(v)
    }
}
