//! The SQLite store: one file, vectors in a `sqlite-vec` `vec0` table, keywords
//! in an FTS5 table.
//!
//! Tables:
//! * `meta(key, value)`: `schema_version`, `model`, `dim`;
//! * `documents(source, hash)`;
//! * `chunks(id, source, ordinal, start_byte, end_byte, text)`;
//! * `chunk_vec`: `vec0(chunk_id, embedding float[dim] distance_metric=cosine)`,
//!   made by the first [`Store::ensure_info`];
//! * `chunk_fts`: contentless FTS5 table over the chunk texts, keyed by chunk
//!   id, tokenizer `unicode61` with diacritics kept.
//!
//! The file is in WAL mode with a busy timeout, so handles of several threads
//! or processes read at once while one writes.

use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::error::one_line;
use crate::{
    check_chunks, check_info, check_query, query_terms, sort_hits, to_i64, to_usize, DocumentInfo,
    Hit, NewChunk, RagError, Result, Store, StoreInfo,
};

/// The layout this build writes and reads.
const SCHEMA_VERSION: i64 = 1;

/// The largest `k` a `vec0` nearest-neighbour query accepts.
const VEC0_MAX_K: usize = 4096;

/// How long a call waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    source TEXT PRIMARY KEY,
    hash   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id         INTEGER PRIMARY KEY,
    source     TEXT NOT NULL REFERENCES documents(source),
    ordinal    INTEGER NOT NULL,
    start_byte INTEGER NOT NULL,
    end_byte   INTEGER NOT NULL,
    text       TEXT NOT NULL,
    UNIQUE (source, ordinal)
);
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_fts USING fts5(
    text,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 0'
);
";

/// Makes `sqlite-vec` part of every connection opened from now on.
fn register_vec() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: the `sqlite-vec` crate declares `sqlite3_vec_init` without
        // parameters, but the symbol is the extension's C entry point
        // `int sqlite3_vec_init(sqlite3 *, char **, const sqlite3_api_routines *)`,
        // which is exactly the function type `sqlite3_auto_extension` expects;
        // the transmute only restores that type. The extension is linked into
        // this binary and lives as long as the process.
        unsafe {
            rusqlite::ffi::sqlite3_auto_extension(Some(std::mem::transmute::<
                *const (),
                unsafe extern "C" fn(
                    *mut rusqlite::ffi::sqlite3,
                    *mut *mut std::os::raw::c_char,
                    *const rusqlite::ffi::sqlite3_api_routines,
                ) -> std::os::raw::c_int,
            >(
                sqlite_vec::sqlite3_vec_init as *const (),
            )));
        }
    });
}

/// A store in one SQLite file.
pub(crate) struct SqliteStore {
    conn: Connection,
    path: String,
}

/// Adds the store's path to SQLite errors.
trait Context<T> {
    fn at(self, path: &str) -> Result<T>;
}

impl<T> Context<T> for rusqlite::Result<T> {
    fn at(self, path: &str) -> Result<T> {
        self.map_err(|e| RagError::Sqlite {
            path: path.to_string(),
            message: one_line(&e.to_string()),
        })
    }
}

fn vector_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// A chunk row with its distance to the query.
struct Near {
    hit: Hit,
    distance: f64,
}

impl SqliteStore {
    /// Opens `path`, creating the file and its tables when missing.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        register_vec();
        let name = path.display().to_string();
        let mut conn = Connection::open(path).map_err(|e| RagError::Sqlite {
            path: name.clone(),
            message: format!("cannot open: {}", one_line(&e.to_string())),
        })?;
        conn.busy_timeout(BUSY_TIMEOUT).at(&name)?;
        // Reading the journal mode back also tells whether the file is a database.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .at(&name)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .at(&name)?;
        conn.pragma_update(None, "foreign_keys", "ON").at(&name)?;

        // An error here means no meta table yet; creating it below reports
        // anything else.
        let version = schema_version(&conn).unwrap_or_default();
        match version {
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) if v > SCHEMA_VERSION => {
                return Err(RagError::SchemaVersion {
                    store: name,
                    found: v,
                    supported: SCHEMA_VERSION,
                })
            }
            _ => {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .at(&name)?;
                tx.execute_batch(SCHEMA).at(&name)?;
                let found = schema_version(&tx).at(&name)?;
                match found {
                    Some(v) if v > SCHEMA_VERSION => {
                        return Err(RagError::SchemaVersion {
                            store: name,
                            found: v,
                            supported: SCHEMA_VERSION,
                        })
                    }
                    Some(_) => {}
                    None => {
                        tx.execute(
                            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                            [SCHEMA_VERSION.to_string()],
                        )
                        .at(&name)?;
                    }
                }
                tx.commit().at(&name)?;
            }
        }
        Ok(Self { conn, path: name })
    }

    fn read_info(conn: &Connection, path: &str) -> Result<Option<StoreInfo>> {
        let get = |key: &str| -> Result<Option<String>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()
            .at(path)
        };
        let (Some(model), Some(dim)) = (get("model")?, get("dim")?) else {
            return Ok(None);
        };
        let dim = dim.parse::<usize>().map_err(|_| RagError::Sqlite {
            path: path.to_string(),
            message: format!("meta table holds an invalid dim {dim:?}"),
        })?;
        Ok(Some(StoreInfo { model, dim }))
    }

    fn dim(&self) -> Result<Option<usize>> {
        Ok(Self::read_info(&self.conn, &self.path)?.map(|info| info.dim))
    }

    fn chunk_ids(conn: &Connection, path: &str, source: &str) -> Result<Vec<i64>> {
        let mut stmt = conn
            .prepare_cached("SELECT id FROM chunks WHERE source = ?1")
            .at(path)?;
        let rows = stmt
            .query_map([source], |row| row.get::<_, i64>(0))
            .at(path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(path)
    }

    /// Removes the chunks of `source` (not the document row).
    fn delete_chunks(conn: &Connection, path: &str, source: &str) -> Result<()> {
        for id in Self::chunk_ids(conn, path, source)? {
            conn.execute("DELETE FROM chunk_fts WHERE rowid = ?1", [id])
                .at(path)?;
            conn.execute("DELETE FROM chunk_vec WHERE chunk_id = ?1", [id])
                .at(path)?;
        }
        conn.execute("DELETE FROM chunks WHERE source = ?1", [source])
            .at(path)?;
        Ok(())
    }

    /// The `fetch` nearest chunks from the `vec0` index, nearest first.
    fn knn(&self, query: &[u8], fetch: usize) -> Result<Vec<Near>> {
        let sql = "
            WITH knn AS (
                SELECT chunk_id, distance FROM chunk_vec
                WHERE embedding MATCH ?1 AND k = ?2
            )
            SELECT c.source, c.ordinal, c.start_byte, c.end_byte, c.text, knn.distance
            FROM knn JOIN chunks c ON c.id = knn.chunk_id";
        self.near_rows(sql, params![query, to_i64(fetch)])
    }

    /// The `k` nearest chunks by a full scan (for `k` past the `vec0` limit).
    fn scan(&self, query: &[u8], k: usize) -> Result<Vec<Near>> {
        let sql = "
            SELECT c.source, c.ordinal, c.start_byte, c.end_byte, c.text,
                   vec_distance_cosine(v.embedding, ?1) AS distance
            FROM chunk_vec v JOIN chunks c ON c.id = v.chunk_id
            ORDER BY distance, c.source, c.ordinal
            LIMIT ?2";
        self.near_rows(sql, params![query, to_i64(k)])
    }

    fn near_rows(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Near>> {
        let mut stmt = self.conn.prepare_cached(sql).at(&self.path)?;
        let rows = stmt
            .query_map(params, |row| {
                Ok(Near {
                    hit: Hit {
                        source: row.get(0)?,
                        ordinal: to_usize(row.get(1)?),
                        start: to_usize(row.get(2)?),
                        end: to_usize(row.get(3)?),
                        text: row.get(4)?,
                        score: 0.0,
                    },
                    distance: row.get(5)?,
                })
            })
            .at(&self.path)?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)?;
        out.sort_by(|a, b| {
            a.distance
                .total_cmp(&b.distance)
                .then_with(|| a.hit.source.cmp(&b.hit.source))
                .then_with(|| a.hit.ordinal.cmp(&b.hit.ordinal))
        });
        Ok(out)
    }
}

fn schema_version(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT value FROM meta WHERE key = 'schema_version'",
        [],
        |row| row.get::<_, String>(0),
    )
    .optional()
    .map(|v| v.and_then(|s| s.parse().ok()))
}

impl Store for SqliteStore {
    fn info(&self) -> Result<Option<StoreInfo>> {
        Self::read_info(&self.conn, &self.path)
    }

    fn ensure_info(&mut self, info: &StoreInfo) -> Result<()> {
        let path = self.path.clone();
        if info.dim == 0 || info.model.trim().is_empty() {
            return Err(RagError::InvalidInfo {
                store: path,
                reason: format!("model {:?} with {} dims", info.model, info.dim),
            });
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&path)?;
        match Self::read_info(&tx, &path)? {
            Some(stored) => return check_info(&path, &stored, info),
            None => {
                tx.execute_batch(&format!(
                    "CREATE VIRTUAL TABLE chunk_vec USING vec0(
                        chunk_id INTEGER PRIMARY KEY,
                        embedding float[{}] distance_metric=cosine
                    )",
                    info.dim
                ))
                .at(&path)?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('model', ?1), ('dim', ?2)",
                    params![info.model, info.dim.to_string()],
                )
                .at(&path)?;
            }
        }
        tx.commit().at(&path)
    }

    fn document_hash(&self, source: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT hash FROM documents WHERE source = ?1",
                [source],
                |row| row.get(0),
            )
            .optional()
            .at(&self.path)
    }

    fn upsert_document(&mut self, source: &str, hash: &str, chunks: &[NewChunk]) -> Result<()> {
        let path = self.path.clone();
        let Some(dim) = self.dim()? else {
            return Err(RagError::NoInfo { store: path });
        };
        check_chunks(&path, dim, source, hash, chunks)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&path)?;
        Self::delete_chunks(&tx, &path, source)?;
        tx.execute(
            "INSERT INTO documents (source, hash) VALUES (?1, ?2)
             ON CONFLICT (source) DO UPDATE SET hash = excluded.hash",
            params![source, hash],
        )
        .at(&path)?;
        {
            let mut chunk_stmt = tx
                .prepare_cached(
                    "INSERT INTO chunks (source, ordinal, start_byte, end_byte, text)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .at(&path)?;
            let mut vec_stmt = tx
                .prepare_cached("INSERT INTO chunk_vec (chunk_id, embedding) VALUES (?1, ?2)")
                .at(&path)?;
            let mut fts_stmt = tx
                .prepare_cached("INSERT INTO chunk_fts (rowid, text) VALUES (?1, ?2)")
                .at(&path)?;
            for chunk in chunks {
                chunk_stmt
                    .execute(params![
                        source,
                        to_i64(chunk.ordinal),
                        to_i64(chunk.start),
                        to_i64(chunk.end),
                        chunk.text
                    ])
                    .at(&path)?;
                let id = tx.last_insert_rowid();
                vec_stmt
                    .execute(params![id, vector_blob(&chunk.embedding)])
                    .at(&path)?;
                fts_stmt.execute(params![id, chunk.text]).at(&path)?;
            }
        }
        tx.commit().at(&path)
    }

    fn delete_document(&mut self, source: &str) -> Result<bool> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&path)?;
        let known = tx
            .query_row(
                "SELECT 1 FROM documents WHERE source = ?1",
                [source],
                |_| Ok(()),
            )
            .optional()
            .at(&path)?
            .is_some();
        if !known {
            return Ok(false);
        }
        // No vector table yet means no chunks either.
        if Self::read_info(&tx, &path)?.is_some() {
            Self::delete_chunks(&tx, &path, source)?;
        }
        tx.execute("DELETE FROM documents WHERE source = ?1", [source])
            .at(&path)?;
        tx.commit().at(&path)?;
        Ok(true)
    }

    fn documents(&self) -> Result<Vec<DocumentInfo>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT d.source, d.hash, count(c.id)
                 FROM documents d LEFT JOIN chunks c ON c.source = d.source
                 GROUP BY d.source, d.hash
                 ORDER BY d.source",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map([], |row| {
                Ok(DocumentInfo {
                    source: row.get(0)?,
                    hash: row.get(1)?,
                    chunks: to_usize(row.get(2)?),
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    fn vector_search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let Some(dim) = self.dim()? else {
            return Ok(Vec::new());
        };
        check_query(&self.path, dim, query)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let blob = vector_blob(query);
        // The index returns `fetch` rows in no defined order among equal
        // distances: fetch more until the k-th distance is not repeated past
        // the end, so that ties are broken by (source, ordinal) here.
        let mut fetch = k;
        let mut rows = loop {
            if fetch > VEC0_MAX_K {
                break self.scan(&blob, k)?;
            }
            let rows = self.knn(&blob, fetch)?;
            let tie_cut = rows.len() == fetch && rows[fetch - 1].distance == rows[k - 1].distance;
            if !tie_cut {
                break rows;
            }
            fetch = fetch.saturating_mul(2);
        };
        rows.truncate(k);
        let mut hits: Vec<Hit> = rows
            .into_iter()
            .map(|near| Hit {
                score: (1.0 - near.distance) as f32,
                ..near.hit
            })
            .collect();
        sort_hits(&mut hits);
        Ok(hits)
    }

    fn keyword_search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        let terms = query_terms(query);
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        // Each word as an FTS5 string, so that no query syntax survives.
        let expr = terms
            .iter()
            .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(" OR ");
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT c.source, c.ordinal, c.start_byte, c.end_byte, c.text,
                        bm25(chunk_fts) AS rank
                 FROM chunk_fts JOIN chunks c ON c.id = chunk_fts.rowid
                 WHERE chunk_fts MATCH ?1
                 ORDER BY rank, c.source, c.ordinal
                 LIMIT ?2",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map(params![expr, to_i64(k)], |row| {
                Ok(Hit {
                    source: row.get(0)?,
                    ordinal: to_usize(row.get(1)?),
                    start: to_usize(row.get(2)?),
                    end: to_usize(row.get(3)?),
                    text: row.get(4)?,
                    // FTS5 gives BM25 negated (lower is better).
                    score: -row.get::<_, f64>(5)? as f32,
                })
            })
            .at(&self.path)?;
        let mut hits = rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)?;
        sort_hits(&mut hits);
        Ok(hits)
    }
}
