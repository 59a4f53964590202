//! What the store tests share: one backend per store kind and small builders.

#![allow(dead_code)]

pub mod pg;

use llama_rag::{NewChunk, Store, StoreInfo};

/// A place to open stores in, alive for one test.
pub trait Backend: Sync {
    /// What [`llama_rag::open`] takes.
    fn spec(&self) -> String;

    /// A new handle on the store.
    fn open(&self) -> Box<dyn Store> {
        llama_rag::open(&self.spec()).unwrap_or_else(|e| panic!("open {}: {e}", self.spec()))
    }
}

/// A SQLite file in a temporary folder.
pub struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    pub fn new() -> Self {
        Sqlite {
            dir: tempfile::tempdir().expect("temporary folder"),
        }
    }
}

impl Backend for Sqlite {
    fn spec(&self) -> String {
        self.dir.path().join("store.db").display().to_string()
    }
}

/// A database on a private PostgreSQL server.
pub struct Postgres {
    server: pg::PgServer,
}

impl Postgres {
    pub fn new() -> Self {
        Postgres {
            server: pg::PgServer::start(),
        }
    }
}

impl Backend for Postgres {
    fn spec(&self) -> String {
        self.server.url.clone()
    }
}

/// The model of most tests: 4-dim vectors.
pub fn info4() -> StoreInfo {
    StoreInfo {
        model: "test-model".to_string(),
        dim: 4,
    }
}

/// A chunk whose range is made up from its ordinal.
pub fn chunk(ordinal: usize, text: &str, embedding: [f32; 4]) -> NewChunk {
    NewChunk {
        ordinal,
        start: ordinal * 1000,
        end: ordinal * 1000 + text.len(),
        text: text.to_string(),
        embedding: embedding.to_vec(),
    }
}

/// A store with [`info4`] recorded.
pub fn ready(backend: &dyn Backend) -> Box<dyn Store> {
    let mut store = backend.open();
    store.ensure_info(&info4()).expect("ensure_info");
    store
}

/// (source, ordinal) of each hit.
pub fn keys(hits: &[llama_rag::Hit]) -> Vec<(String, usize)> {
    hits.iter().map(|h| (h.source.clone(), h.ordinal)).collect()
}

/// `(source, ordinal)` pairs from literals.
pub fn pairs(items: &[(&str, usize)]) -> Vec<(String, usize)> {
    items.iter().map(|(s, o)| (s.to_string(), *o)).collect()
}
