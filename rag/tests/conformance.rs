//! One behaviour, two stores: every case here runs against SQLite (a
//! temporary file) and PostgreSQL (a private server started for the case).

mod common;

use std::time::{Duration, Instant};

use common::{chunk, info4, keys, pairs, ready, Backend};
use llama_rag::{content_hash, hybrid_search, DocumentInfo, RagError, StoreInfo};

/// Runs each named case once per store kind.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::common::Sqlite::new());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::common::Postgres::new());
                }
            )*
        }
    };
}

conformance!(
    insert_and_read_back,
    update_replaces_old_chunks,
    delete_removes_document,
    vector_search_follows_geometry,
    keyword_search_ranks_by_bm25,
    ties_are_ordered_by_source_then_ordinal,
    reopened_store_sees_everything,
    concurrent_readers_agree,
    concurrent_first_opens,
    model_and_dimension_mismatch_refused,
    bad_vectors_refused_and_old_document_kept,
    keyword_query_syntax_is_inert,
    odd_texts,
    hybrid_fuses_both_rankings,
);

fn insert_and_read_back(b: &dyn Backend) {
    let mut store = b.open();
    assert_eq!(store.info().unwrap(), None);
    assert!(store.documents().unwrap().is_empty());
    assert!(store
        .vector_search(&[1.0, 0.0, 0.0, 0.0], 5)
        .unwrap()
        .is_empty());
    assert!(store.keyword_search("anything", 5).unwrap().is_empty());
    // Nothing can be written before the model is known.
    let err = store
        .upsert_document("a.txt", "h", &[chunk(0, "x", [1.0, 0.0, 0.0, 0.0])])
        .unwrap_err();
    assert!(matches!(err, RagError::NoInfo { .. }), "{err}");

    store.ensure_info(&info4()).unwrap();
    assert_eq!(store.info().unwrap(), Some(info4()));
    store.ensure_info(&info4()).unwrap();

    let hash = content_hash(b"first text");
    store
        .upsert_document(
            "a.txt",
            &hash,
            &[
                chunk(0, "The quick brown fox", [1.0, 0.0, 0.0, 0.0]),
                chunk(1, "jumps over the lazy dog", [0.0, 1.0, 0.0, 0.0]),
            ],
        )
        .unwrap();
    store.upsert_document("empty.txt", "e", &[]).unwrap();
    for source in ["b", "C", "é", "a"] {
        store
            .upsert_document(source, "h", &[chunk(0, "filler", [0.0, 0.0, 1.0, 0.0])])
            .unwrap();
    }

    assert_eq!(store.document_hash("a.txt").unwrap(), Some(hash.clone()));
    assert_eq!(store.document_hash("missing").unwrap(), None);
    let docs = store.documents().unwrap();
    let names: Vec<&str> = docs.iter().map(|d| d.source.as_str()).collect();
    assert_eq!(
        names,
        ["C", "a", "a.txt", "b", "empty.txt", "é"],
        "byte order"
    );
    assert_eq!(
        docs[2],
        DocumentInfo {
            source: "a.txt".into(),
            hash,
            chunks: 2
        }
    );
    assert_eq!(docs[4].chunks, 0);

    let hits = store.vector_search(&[0.0, 1.0, 0.0, 0.0], 1).unwrap();
    assert_eq!(keys(&hits), pairs(&[("a.txt", 1)]));
    let hit = &hits[0];
    assert_eq!(hit.text, "jumps over the lazy dog");
    assert_eq!((hit.start, hit.end), (1000, 1000 + hit.text.len()));
    assert!((hit.score - 1.0).abs() < 1e-5, "{}", hit.score);

    let hits = store.keyword_search("FOX", 5).unwrap();
    assert_eq!(keys(&hits), pairs(&[("a.txt", 0)]));
    assert!(hits[0].score > 0.0);
}

fn update_replaces_old_chunks(b: &dyn Backend) {
    let mut store = ready(b);
    store
        .upsert_document(
            "doc",
            "v1",
            &[
                chunk(0, "alpha one", [1.0, 0.0, 0.0, 0.0]),
                chunk(1, "alpha two", [1.0, 0.1, 0.0, 0.0]),
                chunk(2, "alpha three", [1.0, 0.2, 0.0, 0.0]),
            ],
        )
        .unwrap();
    store
        .upsert_document("other", "o", &[chunk(0, "gamma", [0.0, 0.0, 0.0, 1.0])])
        .unwrap();
    store
        .upsert_document(
            "doc",
            "v2",
            &[
                chunk(0, "beta one", [0.0, 1.0, 0.0, 0.0]),
                chunk(1, "beta two", [0.0, 1.0, 0.1, 0.0]),
            ],
        )
        .unwrap();

    assert_eq!(store.document_hash("doc").unwrap().as_deref(), Some("v2"));
    let docs = store.documents().unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].chunks, 2);
    assert!(store.keyword_search("alpha", 10).unwrap().is_empty());
    let beta = store.keyword_search("beta", 10).unwrap();
    assert_eq!(keys(&beta), pairs(&[("doc", 0), ("doc", 1)]));
    let all = store.vector_search(&[1.0, 0.0, 0.0, 0.0], 10).unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|h| !h.text.starts_with("alpha")));
    let near = store.vector_search(&[0.0, 1.0, 0.0, 0.0], 1).unwrap();
    assert_eq!(near[0].text, "beta one");
}

fn delete_removes_document(b: &dyn Backend) {
    let mut store = ready(b);
    store
        .upsert_document("a", "ha", &[chunk(0, "shared apple", [1.0, 0.0, 0.0, 0.0])])
        .unwrap();
    store
        .upsert_document(
            "b",
            "hb",
            &[chunk(0, "shared banana", [1.0, 0.5, 0.0, 0.0])],
        )
        .unwrap();
    assert!(store.delete_document("a").unwrap());
    assert!(!store.delete_document("a").unwrap());
    assert!(!store.delete_document("never").unwrap());
    assert_eq!(store.document_hash("a").unwrap(), None);
    let names: Vec<String> = store
        .documents()
        .unwrap()
        .into_iter()
        .map(|d| d.source)
        .collect();
    assert_eq!(names, ["b"]);
    assert_eq!(
        keys(&store.keyword_search("shared apple", 10).unwrap()),
        pairs(&[("b", 0)])
    );
    assert_eq!(
        keys(&store.vector_search(&[1.0, 0.0, 0.0, 0.0], 10).unwrap()),
        pairs(&[("b", 0)])
    );
    // The source can come back.
    store
        .upsert_document("a", "ha2", &[chunk(0, "apple again", [1.0, 0.0, 0.0, 0.0])])
        .unwrap();
    assert_eq!(
        keys(&store.keyword_search("apple", 10).unwrap()),
        pairs(&[("a", 0)])
    );
}

fn vector_search_follows_geometry(b: &dyn Backend) {
    let mut store = ready(b);
    // Cosine similarity to (1, 0, 0, 0): 1, 0.98, 0.71, 0, -1; lengths differ
    // on purpose (cosine ignores them).
    let vectors = [
        ("west", [-2.0, 0.0, 0.0, 0.0]),
        ("north", [0.0, 3.0, 0.0, 0.0]),
        ("east", [5.0, 0.0, 0.0, 0.0]),
        ("northeast", [1.0, 1.0, 0.0, 0.0]),
        ("almost-east", [1.0, 0.2, 0.0, 0.0]),
    ];
    for (i, (name, v)) in vectors.iter().enumerate() {
        store
            .upsert_document(name, "h", &[chunk(i, name, *v)])
            .unwrap();
    }
    let hits = store.vector_search(&[0.5, 0.0, 0.0, 0.0], 10).unwrap();
    let names: Vec<&str> = hits.iter().map(|h| h.source.as_str()).collect();
    assert_eq!(names, ["east", "almost-east", "northeast", "north", "west"]);
    let expected = [1.0, 1.0 / 1.04f32.sqrt(), 0.5f32.sqrt(), 0.0, -1.0];
    for (hit, want) in hits.iter().zip(expected) {
        assert!(
            (hit.score - want).abs() < 1e-4,
            "{} {} {want}",
            hit.source,
            hit.score
        );
    }
    // Past the SQLite index's k limit (4096) too.
    let many = store.vector_search(&[0.5, 0.0, 0.0, 0.0], 5000).unwrap();
    assert_eq!(keys(&many), keys(&hits));
    let top2 = store.vector_search(&[0.5, 0.0, 0.0, 0.0], 2).unwrap();
    assert_eq!(keys(&top2), keys(&hits[..2]));
    assert!(store
        .vector_search(&[1.0, 0.0, 0.0, 0.0], 0)
        .unwrap()
        .is_empty());

    let err = store.vector_search(&[1.0, 0.0, 0.0], 3).unwrap_err();
    assert!(
        matches!(
            err,
            RagError::QueryWidth {
                got: 3,
                expected: 4,
                ..
            }
        ),
        "{err}"
    );
    let err = store.vector_search(&[0.0; 4], 3).unwrap_err();
    assert!(matches!(err, RagError::InvalidQuery { .. }), "{err}");
}

fn keyword_search_ranks_by_bm25(b: &dyn Backend) {
    let mut store = ready(b);
    let texts = [
        ("common-1", "the cat and the dog"),
        ("common-2", "the dog and the bird"),
        ("common-3", "the bird and the cat"),
        ("rare", "the aardvark and the dog"),
        ("twice", "apple apple cherry pie"),
        ("once", "apple banana cherry pie"),
    ];
    for (i, (name, text)) in texts.iter().enumerate() {
        store
            .upsert_document(name, "h", &[chunk(0, text, [1.0, i as f32, 0.0, 0.0])])
            .unwrap();
    }
    // The rare word outweighs the common ones.
    let hits = store.keyword_search("the aardvark dog", 10).unwrap();
    assert_eq!(hits[0].source, "rare", "{hits:?}");
    assert!(
        hits.windows(2).all(|w| w[0].score >= w[1].score),
        "{hits:?}"
    );
    assert!(hits.iter().all(|h| h.score > 0.0));
    let found: Vec<&str> = hits.iter().map(|h| h.source.as_str()).collect();
    assert!(!found.contains(&"twice") && !found.contains(&"once"));
    // A repeated word counts more (same length, same other words).
    let hits = store.keyword_search("apple", 10).unwrap();
    assert_eq!(keys(&hits), pairs(&[("twice", 0), ("once", 0)]));
    assert!(hits[0].score > hits[1].score);
    // Only the best k, and no hits for unknown words.
    assert_eq!(store.keyword_search("the", 2).unwrap().len(), 2);
    assert!(store.keyword_search("zeppelin", 10).unwrap().is_empty());
    assert!(store.keyword_search("dog", 0).unwrap().is_empty());
}

fn ties_are_ordered_by_source_then_ordinal(b: &dyn Backend) {
    let mut store = ready(b);
    // The same two chunks in six documents, written in reverse order.
    let same = |store: &mut Box<dyn llama_rag::Store>, source: &str| {
        store
            .upsert_document(
                source,
                "h",
                &[
                    chunk(0, "identical words here", [0.3, 0.4, 0.5, 0.6]),
                    chunk(1, "identical words here", [0.3, 0.4, 0.5, 0.6]),
                ],
            )
            .unwrap();
    };
    for source in ["f", "e", "d", "c", "b", "a"] {
        same(&mut store, source);
    }
    let expected = pairs(&[
        ("a", 0),
        ("a", 1),
        ("b", 0),
        ("b", 1),
        ("c", 0),
        ("c", 1),
        ("d", 0),
    ]);
    for k in [1, 3, 7] {
        let v = store.vector_search(&[0.3, 0.4, 0.5, 0.6], k).unwrap();
        assert_eq!(keys(&v), expected[..k], "vector k={k}");
        let kw = store.keyword_search("identical", k).unwrap();
        assert_eq!(keys(&kw), expected[..k], "keyword k={k}");
        let hy = hybrid_search(store.as_ref(), &[0.3, 0.4, 0.5, 0.6], "identical", k).unwrap();
        assert_eq!(keys(&hy), expected[..k], "hybrid k={k}");
    }
    let all = store.vector_search(&[0.3, 0.4, 0.5, 0.6], 100).unwrap();
    assert_eq!(all.len(), 12);
    assert!(all.windows(2).all(|w| w[0].score == w[1].score));
}

fn reopened_store_sees_everything(b: &dyn Backend) {
    {
        let mut store = ready(b);
        store
            .upsert_document(
                "kept.md",
                "hash-1",
                &[chunk(0, "persistent words", [0.0, 0.0, 1.0, 0.0])],
            )
            .unwrap();
    }
    let store = b.open();
    assert_eq!(store.info().unwrap(), Some(info4()));
    assert_eq!(
        store.document_hash("kept.md").unwrap().as_deref(),
        Some("hash-1")
    );
    assert_eq!(store.documents().unwrap().len(), 1);
    assert_eq!(
        keys(&store.keyword_search("persistent", 3).unwrap()),
        pairs(&[("kept.md", 0)])
    );
    assert_eq!(
        keys(&store.vector_search(&[0.0, 0.0, 1.0, 0.0], 3).unwrap()),
        pairs(&[("kept.md", 0)])
    );
    // A second handle next to the first sees writes made through it.
    let mut writer = b.open();
    writer
        .upsert_document(
            "new.md",
            "hash-2",
            &[chunk(0, "fresh words", [0.0, 1.0, 0.0, 0.0])],
        )
        .unwrap();
    assert_eq!(store.documents().unwrap().len(), 2);
}

fn concurrent_readers_agree(b: &dyn Backend) {
    let mut store = ready(b);
    for i in 0..8 {
        let text = format!("report {} about {}", "lemon ".repeat(i % 3 + 1), i);
        let v = [1.0, i as f32 * 0.1, 0.0, 0.0];
        store
            .upsert_document(&format!("doc-{i}"), "h", &[chunk(0, &text, v)])
            .unwrap();
    }
    let query = [1.0, 0.0, 0.0, 0.0];
    let want_v = keys(&store.vector_search(&query, 3).unwrap());
    let want_k = keys(&store.keyword_search("lemon", 3).unwrap());
    assert_eq!(want_v.len(), 3);
    assert_eq!(want_k.len(), 3);
    drop(store);

    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let store = b.open();
                    for _ in 0..15 {
                        assert_eq!(keys(&store.vector_search(&query, 3).unwrap()), want_v);
                        assert_eq!(keys(&store.keyword_search("lemon", 3).unwrap()), want_k);
                    }
                })
            })
            .collect();
        // A writer at the same time, on a document that ranks last in both.
        let writer = scope.spawn(|| {
            let mut store = b.open();
            for round in 0..10 {
                store
                    .upsert_document(
                        "zz-writer",
                        &round.to_string(),
                        &[chunk(0, "unrelated text", [-1.0, 0.0, 0.0, 0.0])],
                    )
                    .unwrap();
            }
        });
        for reader in readers {
            reader.join().expect("reader");
        }
        writer.join().expect("writer");
    });
    assert_eq!(
        b.open().document_hash("zz-writer").unwrap().as_deref(),
        Some("9")
    );
}

fn concurrent_first_opens(b: &dyn Backend) {
    // Several handles create the same new store at once.
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|i| {
                scope.spawn(move || {
                    let mut store = b.open();
                    store.ensure_info(&info4()).unwrap();
                    store
                        .upsert_document(
                            &format!("w{i}"),
                            "h",
                            &[chunk(0, "parallel words", [1.0, i as f32, 0.0, 0.0])],
                        )
                        .unwrap();
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker");
        }
    });
    let store = b.open();
    assert_eq!(store.info().unwrap(), Some(info4()));
    assert_eq!(store.documents().unwrap().len(), 4);
    assert_eq!(store.keyword_search("parallel", 10).unwrap().len(), 4);
}

fn model_and_dimension_mismatch_refused(b: &dyn Backend) {
    let mut store = ready(b);
    store
        .upsert_document("a", "h", &[chunk(0, "words", [1.0, 0.0, 0.0, 0.0])])
        .unwrap();

    let wider = StoreInfo {
        model: "test-model".into(),
        dim: 8,
    };
    let err = store.ensure_info(&wider).unwrap_err();
    assert!(matches!(err, RagError::DimensionMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("test-model (4 dims)") && msg.contains("(8 dims)"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));

    let other = StoreInfo {
        model: "other-model".into(),
        dim: 768,
    };
    let mut second = b.open();
    let err = second.ensure_info(&other).unwrap_err();
    assert!(matches!(err, RagError::ModelMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(
            "was made with model test-model (4 dims); this is model other-model (768 dims)"
        ),
        "{msg}"
    );
    let same_width = StoreInfo {
        model: "other-model".into(),
        dim: 4,
    };
    assert!(matches!(
        second.ensure_info(&same_width),
        Err(RagError::ModelMismatch { .. })
    ));

    // Nothing was written.
    assert_eq!(b.open().info().unwrap(), Some(info4()));
    assert_eq!(store.documents().unwrap().len(), 1);
    assert_eq!(
        store.vector_search(&[1.0, 0.0, 0.0, 0.0], 5).unwrap().len(),
        1
    );
    assert!(matches!(
        store.ensure_info(&StoreInfo {
            model: "m".into(),
            dim: 0
        }),
        Err(RagError::InvalidInfo { .. })
    ));
}

fn bad_vectors_refused_and_old_document_kept(b: &dyn Backend) {
    let mut store = ready(b);
    let good = [
        chunk(0, "original first", [1.0, 0.0, 0.0, 0.0]),
        chunk(1, "original second", [0.0, 1.0, 0.0, 0.0]),
    ];
    store.upsert_document("doc", "old", &good).unwrap();

    let mut narrow = chunk(1, "replacement narrow", [0.0; 4]);
    narrow.embedding = vec![1.0, 0.0, 0.0];
    let err = store
        .upsert_document(
            "doc",
            "new",
            &[chunk(0, "replacement", [1.0, 0.0, 0.0, 0.0]), narrow],
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            RagError::VectorWidth {
                got: 3,
                expected: 4,
                ordinal: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("chunk 1 of doc"), "{err}");

    let nan = chunk(0, "replacement nan", [f32::NAN, 0.0, 0.0, 0.0]);
    assert!(matches!(
        store.upsert_document("doc", "new", &[nan]),
        Err(RagError::InvalidChunk { .. })
    ));
    let zero = chunk(0, "replacement zero", [0.0; 4]);
    assert!(matches!(
        store.upsert_document("doc", "new", &[zero]),
        Err(RagError::InvalidChunk { .. })
    ));
    let twice = [
        chunk(0, "replacement a", [1.0, 0.0, 0.0, 0.0]),
        chunk(0, "replacement b", [1.0, 0.0, 0.0, 0.0]),
    ];
    assert!(matches!(
        store.upsert_document("doc", "new", &twice),
        Err(RagError::InvalidChunk { .. })
    ));
    let mut wide = chunk(0, "fresh doc", [1.0, 0.0, 0.0, 0.0]);
    wide.embedding.push(1.0);
    assert!(store.upsert_document("fresh", "f", &[wide]).is_err());

    // The old document is intact, and no new one appeared.
    assert_eq!(store.document_hash("doc").unwrap().as_deref(), Some("old"));
    assert_eq!(store.document_hash("fresh").unwrap(), None);
    assert_eq!(store.documents().unwrap().len(), 1);
    assert!(store.keyword_search("replacement", 10).unwrap().is_empty());
    assert_eq!(
        keys(&store.keyword_search("original", 10).unwrap()),
        pairs(&[("doc", 0), ("doc", 1)])
    );
    assert_eq!(
        store
            .vector_search(&[1.0, 1.0, 0.0, 0.0], 10)
            .unwrap()
            .len(),
        2
    );
}

fn keyword_query_syntax_is_inert(b: &dyn Backend) {
    let mut store = ready(b);
    store
        .upsert_document(
            "doc",
            "h",
            &[
                chunk(0, "cats or dogs, near the river", [1.0, 0.0, 0.0, 0.0]),
                chunk(1, "a plain sentence", [0.0, 1.0, 0.0, 0.0]),
            ],
        )
        .unwrap();
    let nasty = [
        "\"",
        "*",
        "'",
        "NEAR(",
        "OR",
        "-",
        "AND NOT",
        "\"unbalanced",
        "a*b",
        "text:cats",
        "^cats",
        "(",
        ")",
        "'; DROP TABLE chunks; --",
        "\\",
        "%_",
        "",
        "   ",
        "NEAR(cats dogs, 2)",
        "cats OR",
        "-dogs",
        "\0",
    ];
    for query in nasty {
        let hits = store
            .keyword_search(query, 5)
            .unwrap_or_else(|e| panic!("query {query:?}: {e}"));
        for hit in &hits {
            assert_eq!(hit.source, "doc");
        }
    }
    assert!(store.keyword_search("\"*'-(", 5).unwrap().is_empty());
    // Operators are words like any other.
    assert_eq!(
        keys(&store.keyword_search("NEAR(", 5).unwrap()),
        pairs(&[("doc", 0)])
    );
    assert_eq!(
        keys(&store.keyword_search("\"cats\" OR", 5).unwrap()),
        pairs(&[("doc", 0)])
    );
    // The store still works.
    assert_eq!(store.documents().unwrap().len(), 1);
    assert_eq!(store.keyword_search("plain", 5).unwrap().len(), 1);
}

fn odd_texts(b: &dyn Backend) {
    let mut store = ready(b);
    // A 20,000-character word (encoded data, minified code) is a word like any other.
    let blob = "QUJD".repeat(5000);
    let text = format!("payload {blob} end");
    store
        .upsert_document("blob.txt", "h", &[chunk(0, &text, [1.0, 0.0, 0.0, 0.0])])
        .unwrap();
    assert_eq!(
        keys(&store.keyword_search(&blob, 5).unwrap()),
        pairs(&[("blob.txt", 0)])
    );
    assert_eq!(store.keyword_search("payload", 5).unwrap()[0].text, text);
    // Unicode words, any case.
    store
        .upsert_document(
            "uni.txt",
            "h",
            &[chunk(0, "Größe naïve 日本語", [0.0, 1.0, 0.0, 0.0])],
        )
        .unwrap();
    assert_eq!(
        keys(&store.keyword_search("GRÖSSE größe NAÏVE", 5).unwrap()),
        pairs(&[("uni.txt", 0)])
    );
    // NUL characters are refused (PostgreSQL text cannot hold them), nothing written.
    let err = store
        .upsert_document("nul.txt", "h", &[chunk(0, "a\0b", [1.0, 0.0, 0.0, 0.0])])
        .unwrap_err();
    assert!(matches!(err, RagError::InvalidChunk { .. }), "{err}");
    assert!(store
        .upsert_document("nul\0.txt", "h", &[chunk(0, "ab", [1.0, 0.0, 0.0, 0.0])])
        .is_err());
    assert_eq!(store.documents().unwrap().len(), 2);
}

fn hybrid_fuses_both_rankings(b: &dyn Backend) {
    let mut store = ready(b);
    let q = [0.0, 0.0, 1.0, 0.0];
    // Matches the vector exactly, shares no word with the query text.
    store
        .upsert_document(
            "by-vector",
            "h",
            &[chunk(0, "completely different prose", q)],
        )
        .unwrap();
    // Holds the query word, points elsewhere.
    store
        .upsert_document(
            "by-keyword",
            "h",
            &[chunk(0, "the xylophone solo", [-1.0, 0.0, -0.2, 0.0])],
        )
        .unwrap();
    for i in 0..6 {
        store
            .upsert_document(
                &format!("filler-{i}"),
                "h",
                &[chunk(
                    0,
                    "ordinary filler text",
                    [0.2, 1.0, 0.5, i as f32 * 0.1],
                )],
            )
            .unwrap();
    }
    let vector_only = store.vector_search(&q, 2).unwrap();
    assert!(!vector_only.iter().any(|h| h.source == "by-keyword"));
    let keyword_only = store.keyword_search("xylophone", 5).unwrap();
    assert_eq!(keys(&keyword_only), pairs(&[("by-keyword", 0)]));

    let hits = hybrid_search(store.as_ref(), &q, "xylophone", 2).unwrap();
    let mut found: Vec<&str> = hits.iter().map(|h| h.source.as_str()).collect();
    found.sort();
    assert_eq!(found, ["by-keyword", "by-vector"], "{hits:?}");
    assert!(hits[0].score >= hits[1].score);
    assert!(hybrid_search(store.as_ref(), &q, "xylophone", 0)
        .unwrap()
        .is_empty());
    // With no usable words, hybrid is the vector ranking.
    let hits = hybrid_search(store.as_ref(), &q, "\"*", 3).unwrap();
    assert_eq!(keys(&hits), keys(&store.vector_search(&q, 3).unwrap()));
}

#[test]
fn unreachable_postgres_fails_fast_on_one_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://reader:s3cret@127.0.0.1:{port}/docs");
    let started = Instant::now();
    let err = match llama_rag::open(&url) {
        Ok(_) => panic!("opened a database nobody serves"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
    let msg = err.to_string();
    assert!(matches!(err, RagError::Connect { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "cannot reach the database at postgres://127.0.0.1:{port}/docs: "
        )),
        "{msg}"
    );
    assert!(!msg.contains("s3cret") && !msg.contains('\n'), "{msg}");
}

#[test]
fn sqlite_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder").join("x.db");
    let msg = llama_rag::open(missing.to_str().unwrap())
        .err()
        .expect("a folder that does not exist")
        .to_string();
    assert!(msg.contains(missing.to_str().unwrap()), "{msg}");
    assert!(!msg.contains('\n'));

    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![b'x'; 4096]).unwrap();
    let msg = llama_rag::open(junk.to_str().unwrap())
        .err()
        .expect("not a database")
        .to_string();
    assert!(msg.contains("junk.db"), "{msg}");
}
