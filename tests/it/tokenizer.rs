//! Text in and out, exact with HF: tokenizers from tokenizer.json and from GGUF
//! vocabularies (byte-level BPE and SentencePiece), chat templates, streaming.

use crate::common::gguf_writer::Writer;
use crate::common::*;
use llama::models::GgufFile;
use llama::runtime::{ChatTemplate, Message, Tokenizer};
use proptest::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct TokRef {
    cases: Vec<TokCase>,
    chat_2turn_messages: Vec<Message>,
    chat_2turn_apply_chat_template_ids: Vec<u32>,
    chat_system_messages: Vec<Message>,
}

#[derive(Deserialize)]
struct TokCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
    #[serde(default)]
    label: Option<String>,
}

fn tok_ref() -> TokRef {
    read_json(&smollm2_fixture("tokenization.json"))
}

fn gguf_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(&real_model_path()).unwrap()).unwrap()
}

fn json_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&smollm2_fixture("hf/tokenizer.json")).unwrap()
}

#[test]
fn every_reference_string_from_the_gguf_and_from_tokenizer_json() {
    let r = tok_ref();
    assert_eq!(r.cases.len(), 43);
    for (kind, t) in [
        ("gguf", gguf_tokenizer()),
        ("tokenizer.json", json_tokenizer()),
    ] {
        for c in &r.cases {
            assert_eq!(
                t.encode_plain(&c.text).unwrap(),
                c.ids,
                "{kind}: {:?}",
                c.text
            );
            // SmolLM2 adds no BOS, so the default encoding is the same.
            assert_eq!(t.encode(&c.text).unwrap(), c.ids, "{kind}: {:?}", c.text);
            assert_eq!(
                t.decode_with_special(&c.ids).unwrap(),
                c.decoded,
                "{kind}: decode {:?}",
                c.text
            );
            assert_eq!(
                t.decode(&c.ids).unwrap(),
                c.decoded_skip_special,
                "{kind}: decode {:?}",
                c.text
            );
        }
    }
}

#[test]
fn chat_templates_render_the_reference_conversations() {
    let r = tok_ref();
    let system_case = r
        .cases
        .iter()
        .find(|c| c.label.as_deref() == Some("chat_system_user_no_gen_prompt"))
        .expect("system case");
    let gguf_model = llama::models::GgufFile::open(&real_model_path()).unwrap();
    let from_gguf = {
        // The template as the GGUF carries it, found the way a loaded model finds it.
        let tmpl = gguf_model
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .unwrap()
            .to_string();
        ChatTemplate {
            source: "gguf".into(),
            template: tmpl,
            bos_token: "<|im_start|>".into(),
            eos_token: "<|im_end|>".into(),
        }
    };
    let hf_dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(smollm2_fixture("hf").join(f), hf_dir.path().join(f)).unwrap();
    }
    let tokenizer = gguf_tokenizer();
    let two_turn = from_gguf.render(&r.chat_2turn_messages, true).unwrap();
    assert_eq!(
        tokenizer.encode_plain(&two_turn).unwrap(),
        r.chat_2turn_apply_chat_template_ids
    );
    let system = from_gguf.render(&r.chat_system_messages, false).unwrap();
    assert_eq!(system, system_case.text);
    assert_eq!(tokenizer.encode_plain(&system).unwrap(), system_case.ids);
}

#[test]
fn templates_are_found_where_hf_finds_them() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama3").join(f), dir.path().join(f)).unwrap();
    }
    let load = || llama::models::Model::load(dir.path(), &flex()).unwrap();
    assert!(
        ChatTemplate::for_model(&load()).unwrap().is_none(),
        "no template anywhere"
    );
    let config = serde_json::json!({"chat_template": "config:{{ messages[0].content }}", "bos_token": "<s>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let t = ChatTemplate::for_model(&load()).unwrap().unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "x")], false).unwrap(),
        "config:x"
    );
    assert_eq!(t.bos_token, "<s>");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "jinja:{{ messages[0].content }}",
    )
    .unwrap();
    let t = ChatTemplate::for_model(&load()).unwrap().unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "x")], false).unwrap(),
        "jinja:x",
        "chat_template.jinja wins"
    );
    // Python-style methods, as HF templates use them.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ messages[0].content.strip().upper() }}",
    )
    .unwrap();
    let t = ChatTemplate::for_model(&load()).unwrap().unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "  hi ")], false).unwrap(),
        "HI"
    );
    // A template that fails names where it came from.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ raise_exception('roles must alternate') }}",
    )
    .unwrap();
    let err = ChatTemplate::for_model(&load())
        .unwrap()
        .unwrap()
        .render(&[], true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chat_template.jinja") && err.contains("roles must alternate"),
        "{err}"
    );
}

#[derive(Deserialize)]
struct SpmFixture {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    cases: Vec<SpmCase>,
}

#[derive(Deserialize)]
struct SpmCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn string_array(items: &[String]) -> Vec<u8> {
    let mut v = 8u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for s in items {
        v.extend(crate::common::gguf_writer::gguf_string(s));
    }
    v
}

/// A GGUF holding only the SentencePiece vocabulary of tests/fixtures/spm.json.
fn spm_tokenizer() -> (Tokenizer, SpmFixture) {
    let f: SpmFixture =
        read_json(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm.json"));
    let mut w = Writer::default();
    let mut scores = 6u32.to_le_bytes().to_vec();
    scores.extend_from_slice(&(f.scores.len() as u64).to_le_bytes());
    f.scores
        .iter()
        .for_each(|s| scores.extend_from_slice(&s.to_le_bytes()));
    let mut types = 5u32.to_le_bytes().to_vec();
    types.extend_from_slice(&(f.types.len() as u64).to_le_bytes());
    f.types
        .iter()
        .for_each(|t| types.extend_from_slice(&t.to_le_bytes()));
    w.string("general.architecture", "llama")
        .string("tokenizer.ggml.model", "llama")
        .kv("tokenizer.ggml.tokens", 9, string_array(&f.tokens))
        .kv("tokenizer.ggml.scores", 9, scores)
        .kv("tokenizer.ggml.token_type", 9, types)
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .u32("tokenizer.ggml.unknown_token_id", 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    w.write(&path);
    (
        Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap(),
        f,
    )
}

use std::path::PathBuf;

#[test]
fn a_sentencepiece_vocabulary_matches_sentencepiece() {
    let (t, f) = spm_tokenizer();
    for c in &f.cases {
        assert_eq!(t.encode_plain(&c.text).unwrap(), c.ids, "{:?}", c.text);
        assert_eq!(t.decode(&c.ids).unwrap(), c.decoded, "decode {:?}", c.text);
        assert_eq!(c.decoded, c.text, "the reference round-trips");
        // Llama vocabularies add BOS by default.
        let mut with_bos = vec![1];
        with_bos.extend(&c.ids);
        assert_eq!(t.encode(&c.text).unwrap(), with_bos);
    }
    assert!(
        f.cases
            .iter()
            .any(|c| c.ids.iter().any(|&id| f.types[id as usize] == 6)),
        "byte fallback is exercised"
    );
}

fn check_stream(t: &Tokenizer, text: &str) -> Result<(), TestCaseError> {
    let ids = t.encode_plain(text).unwrap();
    let full = t.decode(&ids).unwrap();
    let mut stream = t.stream();
    let mut shown = String::new();
    for &id in &ids {
        shown.push_str(&stream.push(id).unwrap());
        // Nothing printed is ever taken back or changed by a later token.
        prop_assert!(
            full.starts_with(&shown),
            "{shown:?} is not a prefix of {full:?}"
        );
    }
    shown.push_str(&stream.finish().unwrap());
    prop_assert_eq!(shown, full);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn streaming_byte_tokens_never_splits_a_character(text in "\\PC{0,40}") {
        // One token per byte: multi-byte characters always arrive in pieces.
        let t = Tokenizer::from_file(&fixture("llama3").join("tokenizer.json")).unwrap();
        check_stream(&t, &text)?;
    }

    #[test]
    fn streaming_sentencepiece_with_byte_fallback(text in "\\PC{0,40}") {
        let (t, _) = spm_tokenizer();
        check_stream(&t, &text)?;
    }
}

#[test]
fn tokenize_prints_the_ids_as_json() {
    let r = tok_ref();
    let c = r
        .cases
        .iter()
        .find(|c| c.text.starts_with("<|im_start|>user"))
        .expect("a case with special tokens");
    let model = real_model_path();
    for path in [model.clone(), smollm2_fixture("hf")] {
        let out = llama(&[
            "tokenize",
            "--model",
            path.to_str().unwrap(),
            "--text",
            &c.text,
            "--tokens",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut lines = stdout.lines();
        let ids: Vec<u32> = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(
            ids, c.ids,
            "special tokens in the text are parsed as special"
        );
        let tokens: Vec<String> = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(tokens[0], "<|im_start|>");
    }
}

#[test]
fn chat_generation_prints_the_reference_answer_and_stops_at_the_end_token() {
    let g = crate::common::smollm2::greedy();
    let chat = g.prompts.iter().find(|p| p.name == "g4_chat").unwrap();
    let model = real_model_path();
    let out = llama(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France? Answer in one sentence.",
        "--temperature",
        "0",
        "--max-tokens",
        "48",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, format!("{}\n", chat.output_text_stop_at_eos));
    assert!(!stdout.contains("<|im_end|>"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop: Eos"));
}

#[test]
fn converted_tokenizer_json_is_equivalent_to_the_reference() {
    let t = gguf_tokenizer();
    let ours: serde_json::Value = serde_json::from_str(&t.to_json().unwrap()).unwrap();
    let theirs: serde_json::Value = read_json(&smollm2_fixture("hf/tokenizer.json"));
    assert_eq!(ours["model"]["vocab"], theirs["model"]["vocab"]);
    let pairs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                other => other
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(" "),
            })
            .collect()
    };
    assert_eq!(
        pairs(&ours["model"]["merges"]),
        pairs(&theirs["model"]["merges"])
    );
    let added = |v: &serde_json::Value| -> Vec<(u64, String, bool)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["id"].as_u64().unwrap(),
                    a["content"].as_str().unwrap().to_string(),
                    a["special"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(added(&ours["added_tokens"]), added(&theirs["added_tokens"]));
    assert_eq!(ours["pre_tokenizer"], theirs["pre_tokenizer"]);
    assert_eq!(ours["decoder"]["type"], theirs["decoder"]["type"]);
}

#[test]
fn a_broken_chat_template_is_a_one_line_error_naming_its_source() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama3").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}{{ m.content "}"#,
    )
    .unwrap();
    let out = llama(&[
        "generate",
        "-m",
        dir.path().to_str().unwrap(),
        "--chat",
        "-p",
        "hi",
        "-n",
        "2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("tokenizer_config.json"), "{err}");
}
