//! Embeddings: all-MiniLM-L6-v2 against sentence-transformers, decoder pooling against
//! transformers' hidden states, batching, and bad input; then `llama embed`.

use crate::common::*;
use llama::runtime::{cosine, Backend, Embedder, Engine, Pooling, SessionOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct MiniLmReference {
    sentences: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

fn minilm_reference() -> MiniLmReference {
    read_json(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/embeddings/minilm.json"),
    )
}

fn engine(path: &std::path::Path, backend: Backend) -> Engine {
    let options = SessionOptions {
        backend,
        ..SessionOptions::default()
    };
    Engine::load(path, &options).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every vector within 1e-4 of sentence-transformers' (and a cosine similarity of at
/// least 0.9999), the texts tokenized as it tokenizes them, the batch in one step.
fn check_minilm(backend: Backend) {
    let reference = minilm_reference();
    let engine = engine(&minilm_path(), backend);
    let embedder = Embedder::new(&engine, None).expect("embedder");
    assert_eq!(embedder.dim(), 384);
    assert_eq!(embedder.pooling(), Pooling::Mean, "1_Pooling says mean");
    assert!(embedder.normalizes(), "modules.json has Normalize");
    assert_eq!(
        embedder.max_tokens(),
        256,
        "sentence_bert_config's max_seq_length"
    );
    for (i, (text, want)) in reference
        .sentences
        .iter()
        .zip(&reference.input_ids)
        .enumerate()
    {
        assert_eq!(&embedder.tokenize(text).unwrap(), want, "sentence {i}: ids");
    }
    let got = embedder.embed_texts(&reference.sentences).expect("embeds");
    assert_eq!(got.len(), reference.embeddings.len());
    for (i, (g, w)) in got.iter().zip(&reference.embeddings).enumerate() {
        let diff = max_abs_diff(g, w);
        let cos = cosine(g, w);
        assert!(
            diff <= 1e-4,
            "{backend:?} sentence {i}: max abs diff {diff}"
        );
        assert!(cos >= 0.9999, "{backend:?} sentence {i}: cosine {cos}");
    }
}

#[test]
fn minilm_matches_sentence_transformers_on_flex() {
    check_minilm(Backend::Flex);
}

#[test]
fn minilm_matches_sentence_transformers_on_ndarray() {
    check_minilm(Backend::Ndarray);
}

#[test]
fn minilm_matches_sentence_transformers_on_wgpu() {
    let _ = wgpu(); // fails with the driver to install when there is no adapter
    check_minilm(Backend::Wgpu);
}

#[test]
fn a_batch_embeds_each_text_as_it_embeds_alone() {
    let reference = minilm_reference();
    let engine = engine(&minilm_path(), Backend::Flex);
    let embedder = Embedder::new(&engine, None).unwrap();
    let texts = &reference.sentences[..6];
    let batch = embedder.embed_texts(texts).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let alone = embedder.embed_texts(&[text]).unwrap();
        let diff = max_abs_diff(&alone[0], &batch[i]);
        assert!(diff <= 1e-5, "text {i}: batch and alone differ by {diff}");
    }
    // Similar sentences are nearer than unrelated ones: the vectors mean something.
    let v = embedder
        .embed_texts(&[
            "The cat sat on the mat.",
            "A cat was sitting on a rug.",
            "Quarterly revenue rose by four percent.",
        ])
        .unwrap();
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]) + 0.2);
}

#[test]
fn long_texts_are_cut_to_the_model_limit_and_bad_inputs_refused() {
    let engine = engine(&minilm_path(), Backend::Flex);
    let embedder = Embedder::new(&engine, None).unwrap();
    let long = "word ".repeat(1000);
    let ids = embedder.tokenize(&long).unwrap();
    assert_eq!(ids.len(), 256);
    assert_eq!((ids[0], ids[255]), (101, 102), "[CLS] ... [SEP] kept whole");
    let err = embedder.embed_ids(&[vec![101, 102], vec![]]).unwrap_err();
    assert_eq!(err.to_string(), "input 1 of the batch is empty");
    let err = embedder.embed_ids(&[vec![7; 300]]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "input 0 has 300 tokens; the model embeds at most 256"
    );
    let err = engine.session().unwrap_err().to_string();
    assert!(err.contains("is an encoder (BertModel)"), "{err}");
}

#[derive(Deserialize)]
struct Pooled {
    inputs: Vec<Vec<u32>>,
    mean: Vec<Vec<f32>>,
    last: Vec<Vec<f32>>,
    mean_normalized: Vec<Vec<f32>>,
    last_normalized: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct DecoderPooling {
    models: std::collections::BTreeMap<String, Pooled>,
}

/// Decoders pool their last hidden state (after the final norm) as transformers'
/// `hidden_states[-1]` pooled the same way; vectors come out unit length.
#[test]
fn decoder_mean_and_last_pooling_match_transformers() {
    let reference: DecoderPooling = read_json(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/embeddings/decoder_pooling.json"),
    );
    assert!(reference.models.len() >= 2);
    for (name, want) in &reference.models {
        let options = SessionOptions {
            backend: Backend::Flex,
            precision: llama::runtime::Precision::F32,
            ..SessionOptions::default()
        };
        let engine = Engine::load(&fixture(name), &options).unwrap();
        for (pooling, expected, raw) in [
            (Pooling::Mean, &want.mean_normalized, &want.mean),
            (Pooling::Last, &want.last_normalized, &want.last),
        ] {
            let embedder = Embedder::new(&engine, Some(pooling)).unwrap();
            assert!(embedder.normalizes());
            let got = embedder.embed_ids(&want.inputs).unwrap();
            for (i, (g, w)) in got.iter().zip(expected).enumerate() {
                let diff = max_abs_diff(g, w);
                assert!(
                    diff <= 1e-4,
                    "{name} {pooling:?} input {i}: max abs diff {diff}"
                );
            }
            // The raw pooled vector points the same way.
            for (g, w) in got.iter().zip(raw) {
                assert!(cosine(g, w) > 0.9999);
            }
        }
        // Generation still works on the same engine: the embedder's graph is its own.
        assert!(engine.session().is_ok());
    }
}

#[test]
fn llama_embed_prints_one_json_line_per_text() {
    let reference = minilm_reference();
    let model = minilm_path();
    let model = model.to_str().unwrap();
    let out = llama(&[
        "embed",
        "--model",
        model,
        "--text",
        &reference.sentences[0],
        "--text",
        &reference.sentences[1],
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i);
        assert_eq!(line["tokens"], reference.input_ids[i].len());
        let v: Vec<f32> = serde_json::from_value(line["embedding"].clone()).unwrap();
        assert!(cosine(&v, &reference.embeddings[i]) >= 0.9999);
    }

    // A file of texts, one per line, blank lines skipped.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("texts.txt");
    std::fs::write(
        &file,
        format!("{}\n\n{}\n", reference.sentences[2], reference.sentences[3]),
    )
    .unwrap();
    let out = llama(&["embed", "-m", model, "--file", file.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);

    // Bad input: one line, non-zero exit.
    for (args, expect) in [
        (vec!["embed", "-m", model], "nothing to embed"),
        (
            vec!["embed", "-m", model, "--pooling", "max", "-t", "x"],
            "unknown pooling `max`",
        ),
        (
            vec!["embed", "-m", model, "--file", "/nonexistent/texts.txt"],
            "reading /nonexistent/texts.txt",
        ),
        (
            vec!["generate", "-m", model, "-p", "hello"],
            "is an encoder (BertModel)",
        ),
    ] {
        let out = llama(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

use crate::common::server;

/// `/v1/embeddings` through a real OpenAI client, and raw HTTP for what a client
/// would not send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_embeddings_as_openai_does() {
    use async_openai::types::embeddings::{CreateEmbeddingRequestArgs, EmbeddingInput};
    use base64::Engine as _;

    let reference = minilm_reference();
    let server = server::TestServer::start_model(
        minilm_path(),
        SessionOptions::default(),
        llama::serve::ServerConfig {
            alias: "minilm".into(),
            ..llama::serve::ServerConfig::default()
        },
    )
    .await;
    let client = async_openai::Client::with_config(
        async_openai::config::OpenAIConfig::new()
            .with_api_base(server.url("/v1"))
            .with_api_key("unused"),
    );
    let request = CreateEmbeddingRequestArgs::default()
        .model("minilm")
        .input(EmbeddingInput::StringArray(
            reference.sentences[..4].to_vec(),
        ))
        .build()
        .unwrap();
    let answer = client
        .embeddings()
        .create(request)
        .await
        .expect("embeddings");
    assert_eq!(answer.data.len(), 4);
    let tokens: usize = reference.input_ids[..4].iter().map(Vec::len).sum();
    assert_eq!(answer.usage.prompt_tokens as usize, tokens);
    for (i, e) in answer.data.iter().enumerate() {
        assert_eq!(e.index as usize, i);
        assert!(cosine(&e.embedding, &reference.embeddings[i]) >= 0.9999);
    }

    // Token ids, and base64 (little-endian f32) that decodes to the same vector.
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let http = http.clone();
        let url = server.url("/v1/embeddings");
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = post(serde_json::json!({
        "model": "minilm", "input": reference.input_ids[0], "encoding_format": "base64"
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    let b64 = body["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(v.len(), 384);
    assert!(cosine(&v, &reference.embeddings[0]) >= 0.9999);

    // Bad requests: 400 with OpenAI's error shape, naming the field.
    for (body, param, words) in [
        (
            serde_json::json!({"input": "x", "dimensions": 128}),
            "dimensions",
            "not supported",
        ),
        (serde_json::json!({"input": ""}), "input", "empty string"),
        (serde_json::json!({"input": []}), "input", "empty list"),
        (serde_json::json!({}), "input", "required"),
        (
            serde_json::json!({"input": [1, -2]}),
            "input",
            "not a token id",
        ),
        (
            serde_json::json!({"input": ["ok", 5]}),
            "input[1]",
            "list of token ids",
        ),
        (
            serde_json::json!({"input": [[101, 99999999]]}),
            "input",
            "outside the vocabulary",
        ),
        (
            serde_json::json!({"input": "w ".repeat(600)}),
            "input",
            "over the model's limit of 256",
        ),
        (
            serde_json::json!({"input": "x", "encoding_format": "int8"}),
            "encoding_format",
            "base64",
        ),
    ] {
        let (status, answer) = post(body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{body}: {message}");
    }
    // An embedding model does not generate: 400, not a crash.
    let r = http
        .post(server.url("/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("embedding model"));
}

/// A decoder serves embeddings beside generation (its own head-less graph).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoder_serves_embeddings_and_chat() {
    let server = server::TestServer::start(llama::serve::ServerConfig {
        alias: "smollm2".into(),
        pooling: Some(Pooling::Last),
        ..llama::serve::ServerConfig::default()
    })
    .await;
    let http = reqwest::Client::new();
    let r = http
        .post(server.url("/v1/embeddings"))
        .json(&serde_json::json!({"input": ["The cat sat on the mat.", "Stocks fell."]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let v: Vec<Vec<f32>> = (0..2)
        .map(|i| serde_json::from_value(body["data"][i]["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(v[0].len(), 576, "SmolLM2's hidden size");
    let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "unit length, got {norm}");
    // The same text through the engine alone gives the same vector.
    let engine = Engine::load(&real_model_path(), &server::engine_options()).unwrap();
    let alone = Embedder::new(&engine, Some(Pooling::Last))
        .unwrap()
        .embed_texts(&["The cat sat on the mat."])
        .unwrap();
    assert!(max_abs_diff(&alone[0], &v[0]) <= 1e-5);
    let r = http
        .post(server.url("/v1/completions"))
        .json(&serde_json::json!({"prompt": "Hello", "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
