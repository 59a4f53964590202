//! `llama agent` as a user runs it, with Qwen2.5 0.5B: arithmetic through the
//! calculator, questions over a RAG store with citations, the round limit, and flags
//! that cannot work refused before the model loads.
use std::path::PathBuf;

use crate::common::*;
use serde_json::Value;

fn agent(args: &[&str]) -> (bool, String, String) {
    let out = llama(&[&["agent"][..], args].concat());
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tool_steps(report: &Value) -> Vec<&Value> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| s["kind"] == "tool")
        .collect()
}

#[test]
fn arithmetic_goes_through_the_calculator() {
    let model = qwen25_path();
    let model = model.to_string_lossy();
    let (ok, out, err) = agent(&["--model", &model, "--json", "What is 1234 * 5678?"]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).expect("a JSON report");
    let tools = tool_steps(&report);
    assert!(!tools.is_empty(), "no tool call: {report}");
    assert_eq!(tools[0]["name"], "calculator");
    let args: Value =
        serde_json::from_str(tools[0]["arguments"].as_str().unwrap()).expect("arguments are JSON");
    assert!(args["expression"].is_string(), "{args}");
    assert_eq!(tools[0]["result"], "7006652", "{report}");
    let answer = report["answer"].as_str().expect("an answer");
    assert!(answer.replace(',', "").contains("7006652"), "{answer}");
    assert_eq!(report["stop"], "answered");
    // The trace on stderr names every step.
    let (ok, out, err) = agent(&["--model", &model, "--trace", "What is 999 * 999?"]);
    assert!(ok, "{err}");
    assert!(out.replace(',', "").contains("998001"), "{out}");
    assert!(err.contains("tool calculator"), "{err}");
    assert!(err.contains("result: 998001"), "{err}");
    assert!(err.contains("prompt tokens"), "{err}");
}

#[test]
fn the_round_limit_ends_the_run_with_a_message() {
    let model = qwen25_path();
    let model = model.to_string_lossy();
    // One round: the call runs, and the turn after it would be the second.
    let (ok, out, err) = agent(&[
        "--model",
        &model,
        "--max-rounds",
        "1",
        "What is 1234 * 5678?",
    ]);
    assert!(!ok, "{out}");
    assert!(
        err.trim()
            .ends_with("no answer: the round limit (1) was reached before an answer: the model kept calling tools"),
        "{err}"
    );
}

#[test]
fn questions_over_a_store_are_answered_with_citations() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rag/corpus");
    let db = dir.path().join("docs.db");
    let db = db.to_string_lossy();
    let minilm = minilm_path();
    let minilm = minilm.to_string_lossy();
    let corpus = corpus.to_string_lossy();
    // Three documents, one of which holds the answer.
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for name in [
        "01-marrowick-waste-collection.md",
        "02-marrowick-public-library.md",
        "03-marrowick-parking-permits.md",
    ] {
        std::fs::copy(PathBuf::from(corpus.as_ref()).join(name), docs.join(name)).unwrap();
    }
    let docs = docs.to_string_lossy();
    let out = llama(&[
        "rag",
        "ingest",
        "--store",
        &db,
        "--embed-model",
        &minilm,
        &docs,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = qwen25_path();
    let model = model.to_string_lossy();
    let (ok, out, err) = agent(&[
        "--model",
        &model,
        "--tools",
        "search",
        "--store",
        &db,
        "--embed-model",
        &minilm,
        "-k",
        "2",
        "--json",
        "What does it cost per year to have lawn cuttings and hedge trimmings taken away from my house?",
    ]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).expect("a JSON report");
    let tools = tool_steps(&report);
    assert_eq!(tools[0]["name"], "search", "{report}");
    let sources = report["sources"].as_array().expect("sources");
    let holder = sources
        .iter()
        .find(|s| {
            s["source"]
                .as_str()
                .is_some_and(|p| p.ends_with("01-marrowick-waste-collection.md"))
        })
        .unwrap_or_else(|| panic!("the document that holds the answer was not found: {report}"));
    let answer = report["answer"].as_str().expect("an answer");
    assert!(answer.contains("38"), "{answer}");
    let cited: Vec<u64> = report["cited"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(cited.contains(&holder["n"].as_u64().unwrap()), "{report}");
    for n in &cited {
        assert!(answer.contains(&format!("[{n}]")), "{answer}");
    }
}

/// Flags that cannot work are refused in one line, before any model loads.
#[test]
fn impossible_tool_setups_are_refused() {
    let missing = "/no/such/model.gguf";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--tools", "weather"], "unknown tool `weather`"),
        (vec!["--tools", "files"], "--files"),
        (
            vec!["--tools", "files", "--files", "/no/such/dir"],
            "/no/such/dir",
        ),
        (vec!["--tools", "search"], "--store"),
        (
            vec!["--tools", "calc", "--store", "x.db"],
            "`search` is not among --tools",
        ),
        (vec!["--max-rounds", "0"], "--max-rounds"),
        (vec!["--tool-timeout=0"], "positive number of seconds"),
    ];
    for (flags, words) in cases {
        let (ok, _, err) = agent(&[&["--model", missing][..], &flags, &["task"]].concat());
        assert!(!ok, "{flags:?} was accepted");
        assert!(err.contains(words), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
        assert!(
            !err.contains(missing),
            "{flags:?} loaded the model first: {err}"
        );
    }
}
