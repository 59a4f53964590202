//! Retrieval-augmented generation on the engine: recall of the committed corpus
//! (tests/fixtures/rag) on both stores, `llama rag` as a user runs it, and bad input.
#[allow(dead_code)]
#[path = "../../rag/tests/common/pg.rs"]
mod pg;

use std::path::{Path, PathBuf};

use crate::common::*;
use llama::rag::pipeline::{self, ChunkOptions, SearchMode};
use llama::rag::Store;
use llama::runtime::{Embedder, Engine, SessionOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct Question {
    question: String,
    document: String,
}

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rag/corpus")
}

fn questions() -> Vec<Question> {
    read_json(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rag/questions.json"))
}

fn file_name(source: &str) -> &str {
    Path::new(source)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(source)
}

/// The share of questions whose document is among the first 5 chunks' sources.
fn recall_at_5(store: &dyn Store, embedder: &Embedder, mode: SearchMode) -> f64 {
    let qs = questions();
    let found = qs
        .iter()
        .filter(|q| {
            let hits = pipeline::search(store, embedder, &q.question, 5, mode).unwrap();
            hits.iter().any(|h| file_name(&h.source) == q.document)
        })
        .count();
    found as f64 / qs.len() as f64
}

/// Ingests the corpus into `spec` and checks recall@5: hybrid at least 0.9 and above
/// vector-only and keyword-only.
fn check_recall(spec: &str) {
    let engine = Engine::load(&minilm_path(), &SessionOptions::default()).unwrap();
    let embedder = Embedder::new(&engine, None).unwrap();
    let info = pipeline::store_info(&minilm_path(), &embedder);
    let mut store = llama::rag::open(spec).unwrap();
    let files = pipeline::collect_files(&[corpus()]).unwrap();
    assert!(files.len() >= 30);
    let ingest = |store: &mut dyn Store| {
        pipeline::ingest(
            store,
            &embedder,
            &info,
            &files,
            ChunkOptions::default(),
            &|_| {},
        )
        .unwrap()
    };
    let report = ingest(store.as_mut());
    assert_eq!(report.written.len(), files.len());
    // A second ingest of the same files writes nothing.
    let again = ingest(store.as_mut());
    assert!(again.written.is_empty());
    assert_eq!(again.unchanged.len(), files.len());

    let hybrid = recall_at_5(store.as_ref(), &embedder, SearchMode::Hybrid);
    let vector = recall_at_5(store.as_ref(), &embedder, SearchMode::Vector);
    let keyword = recall_at_5(store.as_ref(), &embedder, SearchMode::Keyword);
    eprintln!("{spec}: recall@5 hybrid {hybrid:.3}, vector {vector:.3}, keyword {keyword:.3}");
    assert!(hybrid >= 0.9, "hybrid recall@5 {hybrid}");
    assert!(
        hybrid > vector,
        "hybrid {hybrid} is not above vector-only {vector}"
    );
    assert!(
        hybrid > keyword,
        "hybrid {hybrid} is not above keyword-only {keyword}"
    );
}

#[test]
fn hybrid_recall_on_sqlite_beats_each_ranking_alone() {
    let dir = tempfile::tempdir().unwrap();
    check_recall(dir.path().join("docs.db").to_str().unwrap());
}

#[test]
fn hybrid_recall_on_postgres_beats_each_ranking_alone() {
    let server = pg::PgServer::start();
    check_recall(&server.url);
}

fn run_ok(args: &[&str]) -> String {
    let out = llama(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One line on stderr naming the problem, a failing exit.
fn run_err(args: &[&str], expect: &str) {
    let out = llama(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(expect), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
}

#[test]
fn llama_rag_ingests_searches_and_answers_with_sources() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for name in [
        "01-marrowick-waste-collection.md",
        "02-marrowick-public-library.md",
    ] {
        let from = corpus().join(name);
        assert!(from.exists(), "{}", from.display());
        std::fs::copy(from, docs.join(name)).unwrap();
    }
    let db = dir.path().join("docs.db");
    let (db, docs_s) = (db.to_str().unwrap(), docs.to_str().unwrap());
    let minilm = minilm_path();
    let minilm = minilm.to_str().unwrap();
    let base = ["--store", db, "--embed-model", minilm];

    let out = run_ok(&[&["rag", "ingest"][..], &base, &[docs_s]].concat());
    assert!(out.starts_with("ingested 2 files"), "{out}");
    let out = run_ok(&[&["rag", "ingest"][..], &base, &[docs_s]].concat());
    assert!(
        out.starts_with("ingested 0 files (0 chunks); 2 unchanged; "),
        "{out}"
    );
    assert!(
        out.contains(" files/s, ") && out.contains(" chunks/s"),
        "{out}"
    );
    // A changed file is written again, alone.
    let changed = docs.join("02-marrowick-public-library.md");
    let mut text = std::fs::read_to_string(&changed).unwrap();
    text.push_str("\nThe reading room closes at noon on the first Monday of each month.\n");
    std::fs::write(&changed, text).unwrap();
    let out = run_ok(&[&["rag", "ingest"][..], &base, &[docs_s]].concat());
    assert!(out.starts_with("ingested 1 files"), "{out}");

    let q = "When does the reading room close on the first Monday?";
    let out = run_ok(&[&["rag", "search"][..], &base, &[q, "--json", "-k", "3"]].concat());
    let hits: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(hits.len(), 3);
    assert!(hits[0]["source"]
        .as_str()
        .unwrap()
        .ends_with("02-marrowick-public-library.md"));
    assert!(hits[0]["text"]
        .as_str()
        .unwrap()
        .contains("reading room closes at noon"));

    let gen = real_model_path();
    let out = run_ok(
        &[
            &["rag", "query"][..],
            &base,
            &["--model", gen.to_str().unwrap(), q, "--json", "-n", "48"],
        ]
        .concat(),
    );
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!answer["answer"].as_str().unwrap().is_empty());
    let sources = answer["sources"].as_array().unwrap();
    assert!(!sources.is_empty());
    assert_eq!(sources[0]["n"], 1);
    assert!(sources[0]["source"]
        .as_str()
        .unwrap()
        .ends_with("02-marrowick-public-library.md"));
    // The answer cites the document that holds the answer (asked of the model when
    // its text cites nothing), and every cited number is in the text.
    let cited: Vec<usize> = answer["cited"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap() as usize)
        .collect();
    assert!(cited.contains(&1), "{answer}");
    for n in &cited {
        assert!(
            (1..=sources.len()).contains(n),
            "cited [{n}] is not a source"
        );
        assert!(answer["answer"]
            .as_str()
            .unwrap()
            .contains(&format!("[{n}]")));
    }
    // The plain output ends with the numbered sources.
    let out = run_ok(
        &[
            &["rag", "query"][..],
            &base,
            &["--model", gen.to_str().unwrap(), q, "-n", "16"],
        ]
        .concat(),
    );
    assert!(out.contains("Sources:\n"), "{out}");
    assert!(out.contains("[1] "), "{out}");
}

#[test]
fn bad_input_is_one_line_and_leaves_the_store_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("docs.db");
    let db = db.to_str().unwrap();
    let minilm = minilm_path();
    let minilm = minilm.to_str().unwrap();
    let base = ["--store", db, "--embed-model", minilm];
    let good = corpus().join("01-marrowick-waste-collection.md");
    let good = good.to_str().unwrap();
    run_ok(&[&["rag", "ingest"][..], &base, &[good]].concat());

    let junk = dir.path().join("junk.md");
    std::fs::write(&junk, [0x7fu8, 0x45, 0x4c, 0x46, 0, 0, 1, 2, 0xff]).unwrap();
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    let dangling = dir.path().join("gone.md");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let second = corpus().join("02-marrowick-public-library.md");
    let second = second.to_str().unwrap();
    for (path, expect) in [
        (junk.to_str().unwrap(), "is not text"),
        (latin1.to_str().unwrap(), "is not UTF-8 text"),
        (dangling.to_str().unwrap(), "cannot read"),
        (empty.to_str().unwrap(), "no text or Markdown files"),
        ("/nonexistent/docs", "no such file or directory"),
    ] {
        // The good second file comes first: nothing of it may be written either.
        run_err(
            &[&["rag", "ingest"][..], &base, &[second, path]].concat(),
            expect,
        );
    }
    let store = llama::rag::open(db).unwrap();
    let docs = store.documents().unwrap();
    assert_eq!(docs.len(), 1, "only the first ingest's document is stored");

    // A store made with another embedding model.
    let tiny = fixture("llama3");
    run_err(
        &[
            "rag",
            "search",
            "--store",
            db,
            "--embed-model",
            tiny.to_str().unwrap(),
            "bins",
        ],
        "was made with all-minilm-l6-v2 (384 dims)",
    );
    run_err(
        &[
            "rag",
            "ingest",
            "--store",
            db,
            "--embed-model",
            tiny.to_str().unwrap(),
            second,
        ],
        "384 dims",
    );
    // An empty store, an empty query, an unreachable database.
    let fresh = dir.path().join("fresh.db");
    run_err(
        &[
            &[
                "rag",
                "search",
                "--store",
                fresh.to_str().unwrap(),
                "--embed-model",
                minilm,
            ][..],
            &["x"],
        ]
        .concat(),
        "is empty: run `llama rag ingest` first",
    );
    run_err(
        &[&["rag", "search"][..], &base, &["  "]].concat(),
        "the query is empty",
    );
    run_err(
        &[
            "rag",
            "search",
            "--store",
            "postgres://rag@127.0.0.1:1/none",
            "--embed-model",
            minilm,
            "x",
        ],
        "cannot reach the database at postgres://127.0.0.1:1/none",
    );
    run_err(
        &[&["rag", "search"][..], &base, &["x", "--mode", "fuzzy"]].concat(),
        "unknown search mode `fuzzy`",
    );
}

/// The counts of `llama rag ingest`'s summary line: (written, chunks, unchanged).
fn ingest_counts(out: &str) -> (usize, usize, usize) {
    let line = out.lines().next().unwrap_or_default();
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(3)
        .filter_map(|s| s.parse().ok())
        .collect();
    assert!(
        line.starts_with("ingested ") && numbers.len() == 3,
        "not an ingest summary: {out}"
    );
    (numbers[0], numbers[1], numbers[2])
}

/// The 42 corpus files twice over (in `a/` and `b/`), with small chunks: an ingest of
/// some seconds, many chunks per file.
fn big_corpus(dir: &Path) -> PathBuf {
    let docs = dir.join("docs");
    for copy in ["a", "b"] {
        let to = docs.join(copy);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(corpus()).unwrap() {
            let from = entry.unwrap().path();
            std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
        }
    }
    docs
}

/// Starts `llama rag ingest` of `docs` into `spec`, SIGKILLs it once the store holds
/// a few documents, ingests again, and checks the rerun against an uninterrupted
/// ingest of the same files into `reference`: the files written before the kill are
/// reported unchanged, and the two stores end with the same documents, hashes, chunk
/// counts and chunks.
fn killed_ingest_resumes(spec: &str, reference: &str, docs: &Path) {
    let minilm = minilm_path();
    let args = |store: &str| -> Vec<String> {
        [
            "rag",
            "ingest",
            "--store",
            store,
            "--embed-model",
            minilm.to_str().unwrap(),
            "--chunk-tokens",
            "32",
            "--overlap",
            "8",
            docs.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let total = pipeline::collect_files(&[docs.to_path_buf()])
        .unwrap()
        .len();
    // The store's model is recorded first, so that the watching handle and the ingest
    // never both create the schema.
    let mut watch = llama::rag::open(spec).unwrap();
    watch
        .ensure_info(&llama::rag::StoreInfo {
            model: "all-minilm-l6-v2".into(),
            dim: 384,
        })
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llama"))
        .args(args(spec))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the binary runs");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the ingest ended ({status}) before the store held 3 of {total} files: \
                 the corpus is too small to kill it half-way on this machine"
            );
        }
        if watch.documents().unwrap().len() >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // `Child::kill` is SIGKILL on Unix: no chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = watch.documents().unwrap();
    assert!(
        kept.len() >= 3 && kept.len() < total,
        "{} of {total} files kept",
        kept.len()
    );
    drop(watch);

    let (written, _, unchanged) = ingest_counts(&run_ok(
        &args(spec).iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(unchanged, kept.len(), "the files written before the kill");
    assert_eq!(written, total - kept.len());
    let (written, chunks, unchanged) = ingest_counts(&run_ok(
        &args(reference)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    assert_eq!((written, unchanged), (total, 0));

    let resumed = llama::rag::open(spec).unwrap();
    let whole = llama::rag::open(reference).unwrap();
    let docs_resumed = resumed.documents().unwrap();
    assert_eq!(docs_resumed, whole.documents().unwrap());
    assert_eq!(docs_resumed.len(), total);
    assert_eq!(docs_resumed.iter().map(|d| d.chunks).sum::<usize>(), chunks);
    // Chunk by chunk: the same texts at the same places, found alike.
    for q in questions() {
        let a = resumed.keyword_search(&q.question, 8).unwrap();
        let b = whole.keyword_search(&q.question, 8).unwrap();
        assert_eq!(a, b, "{}", q.question);
        assert!(!a.is_empty());
    }
}

#[test]
fn a_killed_ingest_on_sqlite_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let docs = big_corpus(dir.path());
    let spec = dir.path().join("killed.db");
    let reference = dir.path().join("whole.db");
    killed_ingest_resumes(spec.to_str().unwrap(), reference.to_str().unwrap(), &docs);
}

#[test]
fn a_killed_ingest_on_postgres_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let docs = big_corpus(dir.path());
    let server = pg::PgServer::start();
    let reference = server.create_database("whole");
    killed_ingest_resumes(&server.url, &reference, &docs);
}

/// Each answer style on SmolLM2-135M: a short answer has text before its first
/// citation and cites only sources that exist; a quote is a sentence of the cited
/// source word for word, the one that answers the question; a free answer says
/// something (the model's words or a quote).
#[test]
fn answer_styles_say_something_and_cite_what_exists() {
    use pipeline::{says_something, AnswerOptions, AnswerStyle};
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for name in [
        "01-marrowick-waste-collection.md",
        "02-marrowick-public-library.md",
    ] {
        std::fs::copy(corpus().join(name), docs.join(name)).unwrap();
    }
    let fact = "The reading room closes at noon on the first Monday of each month.";
    let library = docs.join("02-marrowick-public-library.md");
    let mut text = std::fs::read_to_string(&library).unwrap();
    text.push_str(&format!("\n{fact}\n"));
    std::fs::write(&library, text).unwrap();

    let minilm = Engine::load(&minilm_path(), &SessionOptions::default()).unwrap();
    let embedder = Embedder::new(&minilm, None).unwrap();
    let info = pipeline::store_info(&minilm_path(), &embedder);
    let db = dir.path().join("docs.db");
    let mut store = llama::rag::open(db.to_str().unwrap()).unwrap();
    let files = pipeline::collect_files(&[docs]).unwrap();
    pipeline::ingest(
        store.as_mut(),
        &embedder,
        &info,
        &files,
        ChunkOptions::default(),
        &|_| {},
    )
    .unwrap();
    let chat = Engine::load(&real_model_path(), &SessionOptions::default()).unwrap();
    let q = "When does the reading room close on the first Monday?";
    for style in [AnswerStyle::Short, AnswerStyle::Quote, AnswerStyle::Free] {
        let opts = AnswerOptions {
            k: 3,
            max_tokens: 64,
            style,
            ..AnswerOptions::default()
        };
        let a = pipeline::answer(store.as_ref(), &embedder, &chat, q, &opts).unwrap();
        let n = a.sources.len();
        assert!(says_something(&a.answer), "{style:?}: {:?}", a.answer);
        assert!(!a.cited.is_empty(), "{style:?}: {:?}", a.answer);
        for c in &a.cited {
            assert!((1..=n).contains(c), "{style:?}: cited [{c}] of {n}");
            assert!(
                a.answer.contains(&format!("[{c}]")),
                "{style:?}: {:?}",
                a.answer
            );
        }
        // Every bracket in the answer is a citation of a source that exists.
        for part in a.answer.split('[').skip(1) {
            let number = part.split(']').next().unwrap();
            let k: usize = number
                .parse()
                .unwrap_or_else(|_| panic!("{style:?}: [{number}] in {:?}", a.answer));
            assert!((1..=n).contains(&k), "{style:?}: {:?}", a.answer);
        }
        if style == AnswerStyle::Short {
            let before = a.answer.split('[').next().unwrap().trim();
            assert!(before.chars().count() >= 9, "{:?}", a.answer);
        }
        if style == AnswerStyle::Quote {
            let quote = a.quote.as_ref().expect("a quote");
            assert!(a.cited.contains(&quote.n));
            let source = &a.sources[quote.n - 1];
            assert!(source.text.contains(&quote.text), "{quote:?}");
            // From the source that holds the answer, the sentence that holds it.
            if source.text.contains(fact) {
                assert_eq!(quote.text, fact);
            }
            assert!(a
                .answer
                .ends_with(&format!("Quoted from [{}]: \"{}\"", quote.n, quote.text)));
        }
    }
}
