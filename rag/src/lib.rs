//! Storage and retrieval for retrieval-augmented generation.
//!
//! A [`Store`] keeps documents split into chunks, each chunk with its text, its
//! byte range in the source text and an embedding vector computed by the
//! caller. Two implementations share one behaviour (and one test suite):
//!
//! * SQLite (the embedded default): one file, vectors in a `sqlite-vec`
//!   `vec0` table (cosine distance), keywords in an FTS5 table ranked by its
//!   `bm25()`.
//! * PostgreSQL (scale-out): vectors in a `pgvector` column with an HNSW
//!   index (cosine distance), keywords ranked by BM25 over a term table.
//!
//! [`open`] picks the implementation from its argument. [`chunk_spans`] splits
//! a text into overlapping token windows, [`hybrid_search`] fuses vector and
//! keyword rankings with [`rrf`].
//!
//! The stores compute no embeddings and run no tokenizer of a model: vectors and
//! token offsets come from the caller. [`pipeline`] is that caller on our engine:
//! ingest (chunk by the embedding model's tokens, embed in batches, write), search,
//! and answers with numbered, cited sources from a chat model.
//!
//! # Example
//!
//! ```
//! use llama_rag::{chunk_spans, content_hash, hybrid_search, open, NewChunk, StoreInfo};
//!
//! # fn main() -> llama_rag::Result<()> {
//! # let dir = std::env::temp_dir().join(format!("llama-rag-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = dir.join("docs.db");
//! # let path = path.to_str().unwrap();
//! // A toy embedding: real callers run their embedding model here.
//! let embed = |text: &str| vec![text.len() as f32, 1.0, 0.0];
//!
//! let mut store = open(path)?; // or "postgres://user@host/db"
//! store.ensure_info(&StoreInfo { model: "toy".into(), dim: 3 })?;
//!
//! let text = "Cats purr. Dogs bark.\n\nBirds sing.";
//! // Token spans from the embedding model's tokenizer; words here.
//! let mut tokens = Vec::new();
//! let mut at = 0;
//! for word in text.split_whitespace() {
//!     let start = at + text[at..].find(word).unwrap();
//!     tokens.push((start, start + word.len()));
//!     at = start + word.len();
//! }
//! let chunks: Vec<NewChunk> = chunk_spans(text, &tokens, 4, 1)
//!     .into_iter()
//!     .enumerate()
//!     .map(|(ordinal, (start, end))| NewChunk {
//!         ordinal,
//!         start,
//!         end,
//!         text: text[start..end].to_string(),
//!         embedding: embed(&text[start..end]),
//!     })
//!     .collect();
//! store.upsert_document("pets.md", &content_hash(text.as_bytes()), &chunks)?;
//!
//! let hits = hybrid_search(store.as_ref(), &embed("bark"), "do dogs bark?", 3)?;
//! assert!(hits.iter().any(|hit| hit.text.contains("Dogs bark.")));
//! # drop(store);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(())
//! # }
//! ```
//!
//! # Keyword tokens
//!
//! Keyword search splits text into words with [`keyword_terms`]: maximal runs
//! of Unicode alphanumeric characters, lowercased. The SQLite store lets FTS5's
//! `unicode61` tokenizer (diacritics kept) do the same on its side; the
//! PostgreSQL store stores the output of [`keyword_terms`] itself.
//!
//! # Threads and async
//!
//! The [`Store`] trait is synchronous. The PostgreSQL store owns a small
//! current-thread tokio runtime and blocks on it, so its methods must not be
//! called from inside an async runtime: async callers wrap them in
//! `tokio::task::spawn_blocking`. A store handle is `Send` but not shared
//! between threads; several handles from several [`open`] calls on the same
//! store may be used from several threads at once.

#![warn(missing_docs)]

mod answer_kind;
mod chunk;
mod error;
mod fusion;
pub mod pipeline;
mod postgres;
mod quote;
mod sqlite;

use std::collections::BTreeSet;

pub use chunk::chunk_spans;
pub use error::{RagError, Result};
pub use fusion::{hybrid_search, rrf, RRF_K};

use sha2::{Digest, Sha256};

/// The embedding model a store was built with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// Identifier of the embedding model (for example its repository name).
    pub model: String,
    /// Width of its vectors.
    pub dim: usize,
}

/// One chunk of a document, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChunk {
    /// Position of the chunk in its document, from 0; unique per document.
    pub ordinal: usize,
    /// Byte offset of the chunk's first byte in the source text.
    pub start: usize,
    /// Byte offset just past the chunk's last byte in the source text.
    pub end: usize,
    /// The chunk's text.
    pub text: String,
    /// The chunk's embedding, as wide as the store's [`StoreInfo::dim`].
    pub embedding: Vec<f32>,
}

/// A chunk found by a search.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The document the chunk belongs to.
    pub source: String,
    /// Position of the chunk in its document.
    pub ordinal: usize,
    /// Byte offset of the chunk's first byte in the source text.
    pub start: usize,
    /// Byte offset just past the chunk's last byte in the source text.
    pub end: usize,
    /// The chunk's text.
    pub text: String,
    /// Relevance, higher is better; its meaning depends on the search.
    pub score: f32,
}

/// A stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentInfo {
    /// The document's name (usually a file path).
    pub source: String,
    /// The content hash recorded with it (see [`content_hash`]).
    pub hash: String,
    /// How many chunks it has.
    pub chunks: usize,
}

/// A document store: chunks with their vectors and keywords.
///
/// Every write is one transaction: a failed call leaves the store as it was.
pub trait Store: Send {
    /// The store's embedding model and width, `None` for a store that has none yet.
    fn info(&self) -> Result<Option<StoreInfo>>;

    /// Records `info` on a new store. On a store made with another model or
    /// width: [`RagError::ModelMismatch`] or [`RagError::DimensionMismatch`]
    /// naming both, and nothing written.
    fn ensure_info(&mut self, info: &StoreInfo) -> Result<()>;

    /// The hash recorded with `source`, `None` when it is not stored.
    fn document_hash(&self, source: &str) -> Result<Option<String>>;

    /// Replaces every chunk of `source` with `chunks`, and its hash with
    /// `hash`, in one transaction (inserts the document when new). Vectors of
    /// the wrong width, non-finite or all-zero vectors and repeated ordinals
    /// are refused before anything is written; any failure leaves the old
    /// document as it was.
    fn upsert_document(&mut self, source: &str, hash: &str, chunks: &[NewChunk]) -> Result<()>;

    /// Removes `source` and its chunks; `false` when it was not stored.
    fn delete_document(&mut self, source: &str) -> Result<bool>;

    /// Every stored document, sorted by source.
    fn documents(&self) -> Result<Vec<DocumentInfo>>;

    /// The `k` chunks nearest to `query` by cosine similarity (the score),
    /// best first; ties broken by (source, ordinal).
    fn vector_search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>>;

    /// The `k` chunks ranked best by BM25 (k1 = 1.2, b = 0.75) for the words
    /// of `query` (see [`keyword_terms`]); the score is the BM25 score, higher
    /// is better; best first, ties broken by (source, ordinal). A query with no
    /// words returns no hits.
    fn keyword_search(&self, query: &str, k: usize) -> Result<Vec<Hit>>;
}

/// Opens (creating when missing) a store.
///
/// `postgres://…` and `postgresql://…` URLs open a PostgreSQL database (the
/// `vector` extension is created when missing); anything else is the path of a
/// SQLite file, created when missing (its folder must exist).
pub fn open(spec: &str) -> Result<Box<dyn Store>> {
    if postgres::is_postgres_url(spec) {
        Ok(Box::new(postgres::PgStore::open(spec)?))
    } else {
        Ok(Box::new(sqlite::SqliteStore::open(std::path::Path::new(
            spec,
        ))?))
    }
}

/// SHA-256 of `bytes` as 64 lowercase hex digits.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The words keyword search sees in `text`, in order: maximal runs of Unicode
/// alphanumeric characters, lowercased. Everything else (punctuation, quotes,
/// operators such as `*`, `-`, `NEAR(`) separates words.
pub fn keyword_terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// English function words that a keyword query leaves out: every text has them, so
/// they rank chunks by noise (BM25 gives them a small weight, but over many query
/// words the noise adds up and outvotes the one rare word that matters). Left in the
/// index: only queries skip them.
const STOPWORDS: &[&str] = &[
    "a", "about", "after", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be",
    "been", "before", "being", "but", "by", "can", "could", "did", "do", "does", "each", "for",
    "from", "had", "has", "have", "he", "her", "his", "how", "i", "if", "in", "into", "is", "it",
    "its", "may", "me", "might", "my", "no", "not", "of", "on", "or", "our", "she", "should", "so",
    "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those",
    "to", "too", "up", "us", "was", "we", "were", "what", "when", "where", "which", "while", "who",
    "whom", "why", "will", "with", "would", "you", "your",
];

/// Whether `word` (lowercase) is one of the English function words queries skip.
pub(crate) fn is_stopword(word: &str) -> bool {
    STOPWORDS.contains(&word)
}

/// The distinct words of a query, sorted, without English function words (unless the
/// query has nothing else).
pub(crate) fn query_terms(query: &str) -> Vec<String> {
    let all: BTreeSet<String> = keyword_terms(query).into_iter().collect();
    let content: Vec<String> = all
        .iter()
        .filter(|t| !STOPWORDS.contains(&t.as_str()))
        .cloned()
        .collect();
    if content.is_empty() {
        all.into_iter().collect()
    } else {
        content
    }
}

/// Orders hits best first: higher score, then (source, ordinal).
pub(crate) fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.source.cmp(&b.source))
            .then_with(|| a.ordinal.cmp(&b.ordinal))
    });
}

/// What a write refuses before touching the store: bad vectors, repeated
/// ordinals, ranges that are not ranges, NUL characters.
pub(crate) fn check_chunks(
    store: &str,
    dim: usize,
    source: &str,
    hash: &str,
    chunks: &[NewChunk],
) -> Result<()> {
    // PostgreSQL text cannot hold NUL; refused by both stores alike.
    if source.contains('\0') || hash.contains('\0') {
        return Err(RagError::InvalidChunk {
            document: source.replace('\0', "\\0"),
            ordinal: 0,
            reason: "source or hash contains a NUL character".to_string(),
        });
    }
    let mut seen = BTreeSet::new();
    for chunk in chunks {
        if chunk.embedding.len() != dim {
            return Err(RagError::VectorWidth {
                store: store.to_string(),
                document: source.to_string(),
                ordinal: chunk.ordinal,
                got: chunk.embedding.len(),
                expected: dim,
            });
        }
        check_vector(&chunk.embedding).map_err(|reason| RagError::InvalidChunk {
            document: source.to_string(),
            ordinal: chunk.ordinal,
            reason,
        })?;
        if chunk.text.contains('\0') {
            return Err(RagError::InvalidChunk {
                document: source.to_string(),
                ordinal: chunk.ordinal,
                reason: "text contains a NUL character".to_string(),
            });
        }
        if !seen.insert(chunk.ordinal) {
            return Err(RagError::InvalidChunk {
                document: source.to_string(),
                ordinal: chunk.ordinal,
                reason: "ordinal given twice".to_string(),
            });
        }
        if chunk.start > chunk.end {
            return Err(RagError::InvalidChunk {
                document: source.to_string(),
                ordinal: chunk.ordinal,
                reason: format!("start {} is past end {}", chunk.start, chunk.end),
            });
        }
        if i64::try_from(chunk.end).is_err() || i64::try_from(chunk.ordinal).is_err() {
            return Err(RagError::InvalidChunk {
                document: source.to_string(),
                ordinal: chunk.ordinal,
                reason: "offset too large".to_string(),
            });
        }
    }
    Ok(())
}

/// The error for a store whose recorded model differs from `info`, or Ok.
pub(crate) fn check_info(store: &str, stored: &StoreInfo, info: &StoreInfo) -> Result<()> {
    if stored.model != info.model {
        return Err(RagError::ModelMismatch {
            store: store.to_string(),
            stored_model: stored.model.clone(),
            stored_dim: stored.dim,
            model: info.model.clone(),
            dim: info.dim,
        });
    }
    if stored.dim != info.dim {
        return Err(RagError::DimensionMismatch {
            store: store.to_string(),
            stored_model: stored.model.clone(),
            stored_dim: stored.dim,
            model: info.model.clone(),
            dim: info.dim,
        });
    }
    Ok(())
}

/// Checks a query vector against the store's width.
pub(crate) fn check_query(store: &str, dim: usize, query: &[f32]) -> Result<()> {
    if query.len() != dim {
        return Err(RagError::QueryWidth {
            store: store.to_string(),
            got: query.len(),
            expected: dim,
        });
    }
    check_vector(query).map_err(|reason| RagError::InvalidQuery { reason })
}

/// Cosine similarity needs finite values and a length that is not zero.
fn check_vector(v: &[f32]) -> std::result::Result<(), String> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("vector value {i} is {}", v[i]));
    }
    if v.iter().all(|x| *x == 0.0) {
        return Err("vector is all zeros (no direction for cosine similarity)".to_string());
    }
    Ok(())
}

/// Reads a stored non-negative integer back as `usize` (0 if negative).
pub(crate) fn to_usize(v: i64) -> usize {
    usize::try_from(v).unwrap_or(0)
}

/// A `usize` to store as a SQL integer (saturating).
pub(crate) fn to_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            content_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(content_hash(b"").len(), 64);
    }

    #[test]
    fn terms_split_and_lowercase() {
        assert_eq!(
            keyword_terms("Hello, WORLD! naïve-Café \"x*\" NEAR( 'q' 42"),
            vec!["hello", "world", "naïve", "café", "x", "near", "q", "42"]
        );
        assert!(keyword_terms("\"*' - ( ) ^ :").is_empty());
        assert_eq!(query_terms("c b c"), vec!["b", "c"]);
        // Function words drop out of a query, unless nothing else is left.
        assert_eq!(query_terms("What is the KX-400 for?"), vec!["400", "kx"]);
        assert_eq!(query_terms("the who"), vec!["the", "who"]);
    }
}
