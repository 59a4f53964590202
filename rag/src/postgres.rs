//! The PostgreSQL store: vectors in a `pgvector` column, BM25 over a term table.
//!
//! Tables (all prefixed `rag_`):
//! * `rag_meta`: one row with the schema version, the model and width, and
//!   the chunk and token counts that BM25 needs;
//! * `rag_documents(source, hash)`;
//! * `rag_chunks(id, source, ordinal, start_byte, end_byte, text, length,
//!   embedding vector(dim))` with an HNSW index (`vector_cosine_ops`) when the
//!   width is at most 2000 (the index's limit), made by the first
//!   [`Store::ensure_info`];
//! * `rag_terms(chunk_id, term, tf)`: the words of each chunk as
//!   [`crate::keyword_terms`] finds them (cut to 256 bytes), with their
//!   counts; `length` of a chunk is its number of words.
//!
//! Keyword search computes BM25 (k1 = 1.2, b = 0.75, idf
//! `ln((N - n + 0.5) / (n + 0.5))` floored at 1e-6, as SQLite's FTS5 does) in
//! one query. Vector search is exact while the planner scans the table and
//! approximate (HNSW, `ef_search` at least `k`, at most 1000) once it uses
//! the index (on larger tables).
//!
//! The store owns a current-thread tokio runtime and one connection, and
//! blocks on them: call it from plain threads (in async code, from
//! `spawn_blocking`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};

use crate::error::one_line;
use crate::{
    check_chunks, check_info, check_query, keyword_terms, query_terms, sort_hits, to_i64, to_usize,
    DocumentInfo, Hit, NewChunk, RagError, Result, Store, StoreInfo,
};

/// The layout this build writes and reads.
const SCHEMA_VERSION: i32 = 1;

/// How long opening waits for the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The widest vector an HNSW index takes.
const HNSW_MAX_DIM: usize = 2000;

/// Key of the advisory lock that serializes schema changes.
const SCHEMA_LOCK: i64 = 0x6c6c_616d_6172_6167;

/// BM25 parameters, the same as FTS5's.
const BM25_K1: f64 = 1.2;
const BM25_B: f64 = 0.75;

/// The longest term stored, in bytes: longer words (encoded data, minified
/// code) are cut to this length, which keeps them under the B-tree's limit on
/// index entries and still lets them match themselves.
const MAX_TERM_BYTES: usize = 256;

/// A word as the term table stores it.
fn index_term(mut term: String) -> String {
    if term.len() > MAX_TERM_BYTES {
        let mut cut = MAX_TERM_BYTES;
        while !term.is_char_boundary(cut) {
            cut -= 1;
        }
        term.truncate(cut);
    }
    term
}

/// Whether `spec` names a PostgreSQL database.
pub(crate) fn is_postgres_url(spec: &str) -> bool {
    let lower = spec.get(..13).unwrap_or(spec).to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// `spec` without user name, password and parameters, for messages.
pub(crate) fn display_url(spec: &str) -> String {
    let (scheme, rest) = spec.split_once("://").unwrap_or(("postgres", spec));
    let rest = rest.split_once('?').map_or(rest, |(before, _)| before);
    // Everything up to the last '@' is user information.
    let rest = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
    format!("{scheme}://{rest}")
}

/// One line for a failed call.
fn describe(e: &sqlx::Error) -> String {
    let text = match e {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Database(db) => db.message().to_string(),
        other => other.to_string(),
    };
    one_line(&text)
}

/// A store in a PostgreSQL database.
pub(crate) struct PgStore {
    conn: Mutex<Option<PgConnection>>,
    rt: tokio::runtime::Runtime,
    url: String,
}

impl PgStore {
    /// Connects to `spec` and creates the tables (and the `vector` extension)
    /// when missing.
    pub(crate) fn open(spec: &str) -> Result<Self> {
        let url = display_url(spec);
        let connect_err = |message: String| RagError::Connect {
            url: url.clone(),
            message,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| connect_err(format!("cannot start an async runtime: {e}")))?;
        let options: PgConnectOptions = spec
            .parse()
            .map_err(|e| connect_err(format!("invalid URL: {}", describe(&e))))?;
        let options = options.application_name("llama-rag");
        let mut conn = rt.block_on(async {
            match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await
            {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(connect_err(describe(&e))),
                Err(_) => Err(connect_err(format!(
                    "no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ))),
            }
        })?;
        rt.block_on(create_schema(&mut conn, &url))?;
        Ok(Self {
            conn: Mutex::new(Some(conn)),
            rt,
            url,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<PgConnection>> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connection inside a locked guard.
    fn conn<'g>(&self, guard: &'g mut Option<PgConnection>) -> Result<&'g mut PgConnection> {
        guard.as_mut().ok_or_else(|| RagError::Postgres {
            url: self.url.clone(),
            message: "connection closed".to_string(),
        })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(conn) = conn {
            self.rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
            });
        }
    }
}

/// Maps a failed call to an error naming the database.
fn db_err(url: &str) -> impl Fn(sqlx::Error) -> RagError + '_ {
    move |e| RagError::Postgres {
        url: url.to_string(),
        message: describe(&e),
    }
}

/// Commits `tx` when `result` is Ok, rolls it back otherwise (at once, so
/// that no lock outlives a failed call).
async fn finish<T>(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    url: &str,
    result: Result<T>,
) -> Result<T> {
    match result {
        Ok(value) => {
            tx.commit().await.map_err(db_err(url))?;
            Ok(value)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

async fn create_schema(conn: &mut PgConnection, url: &str) -> Result<()> {
    if let Some(version) = schema_version(conn, url).await? {
        return check_version(url, version);
    }
    let mut tx = conn.begin().await.map_err(db_err(url))?;
    let result = create_tables(&mut tx, url).await;
    finish(tx, url, result).await
}

async fn create_tables(tx: &mut PgConnection, url: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db_err(url))?;
    sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS vector")
        .execute(&mut *tx)
        .await
        .map_err(|e| RagError::Postgres {
            url: url.to_string(),
            message: format!(
                "cannot enable the pgvector extension (CREATE EXTENSION vector): {}",
                describe(&e)
            ),
        })?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS rag_meta (
            id             integer PRIMARY KEY CHECK (id = 1),
            schema_version integer NOT NULL,
            model          text,
            dim            integer,
            chunk_count    bigint NOT NULL DEFAULT 0,
            token_count    bigint NOT NULL DEFAULT 0
        );
        CREATE TABLE IF NOT EXISTS rag_documents (
            source text PRIMARY KEY,
            hash   text NOT NULL
        );",
    )
    .execute(&mut *tx)
    .await
    .map_err(db_err(url))?;
    sqlx::query(
        "INSERT INTO rag_meta (id, schema_version) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
    )
    .bind(SCHEMA_VERSION)
    .execute(&mut *tx)
    .await
    .map_err(db_err(url))?;
    let version: i32 = sqlx::query_scalar("SELECT schema_version FROM rag_meta WHERE id = 1")
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err(url))?;
    check_version(url, version)
}

fn check_version(url: &str, version: i32) -> Result<()> {
    if version > SCHEMA_VERSION {
        return Err(RagError::SchemaVersion {
            store: url.to_string(),
            found: i64::from(version),
            supported: i64::from(SCHEMA_VERSION),
        });
    }
    Ok(())
}

/// The recorded schema version, `None` when the tables are missing.
async fn schema_version(conn: &mut PgConnection, url: &str) -> Result<Option<i32>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('rag_meta') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err(url))?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT schema_version FROM rag_meta WHERE id = 1")
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err(url))
}

async fn read_info<'e, E>(executor: E, url: &str) -> Result<Option<StoreInfo>>
where
    E: sqlx::PgExecutor<'e>,
{
    let row: Option<(Option<String>, Option<i32>)> =
        sqlx::query_as("SELECT model, dim FROM rag_meta WHERE id = 1")
            .fetch_optional(executor)
            .await
            .map_err(db_err(url))?;
    Ok(match row {
        Some((Some(model), Some(dim))) => Some(StoreInfo {
            model,
            dim: usize::try_from(dim).unwrap_or(0),
        }),
        _ => None,
    })
}

async fn ensure_info(conn: &mut PgConnection, url: &str, info: &StoreInfo) -> Result<()> {
    let dim = match i32::try_from(info.dim) {
        Ok(dim) if dim > 0 && !info.model.trim().is_empty() => dim,
        _ => {
            return Err(RagError::InvalidInfo {
                store: url.to_string(),
                reason: format!("model {:?} with {} dims", info.model, info.dim),
            })
        }
    };
    let mut tx = conn.begin().await.map_err(db_err(url))?;
    let result = record_info(&mut tx, url, info, dim).await;
    finish(tx, url, result).await
}

async fn record_info(tx: &mut PgConnection, url: &str, info: &StoreInfo, dim: i32) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db_err(url))?;
    if let Some(stored) = read_info(&mut *tx, url).await? {
        return check_info(url, &stored, info);
    }
    let mut ddl = format!(
        "CREATE TABLE rag_chunks (
            id         bigserial PRIMARY KEY,
            source     text NOT NULL REFERENCES rag_documents(source) ON DELETE CASCADE,
            ordinal    bigint NOT NULL,
            start_byte bigint NOT NULL,
            end_byte   bigint NOT NULL,
            text       text NOT NULL,
            length     integer NOT NULL,
            embedding  vector({dim}) NOT NULL,
            UNIQUE (source, ordinal)
        );
        CREATE TABLE rag_terms (
            chunk_id bigint NOT NULL REFERENCES rag_chunks(id) ON DELETE CASCADE,
            term     text NOT NULL,
            tf       integer NOT NULL,
            PRIMARY KEY (term, chunk_id) INCLUDE (tf)
        );
        CREATE INDEX rag_terms_chunk ON rag_terms (chunk_id);"
    );
    if info.dim <= HNSW_MAX_DIM {
        ddl.push_str(
            "CREATE INDEX rag_chunks_embedding ON rag_chunks
             USING hnsw (embedding vector_cosine_ops);",
        );
    }
    sqlx::raw_sql(&ddl)
        .execute(&mut *tx)
        .await
        .map_err(db_err(url))?;
    sqlx::query("UPDATE rag_meta SET model = $1, dim = $2 WHERE id = 1")
        .bind(&info.model)
        .bind(dim)
        .execute(&mut *tx)
        .await
        .map_err(db_err(url))?;
    Ok(())
}

/// Locks the meta row (serializing writers) and returns the width, if any.
async fn lock_meta(tx: &mut PgConnection, url: &str) -> Result<Option<usize>> {
    let dim: Option<i32> = sqlx::query_scalar("SELECT dim FROM rag_meta WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err(url))?;
    Ok(dim.and_then(|d| usize::try_from(d).ok()))
}

/// Removes the chunks of `source` and takes them off the BM25 counts.
async fn remove_chunks(tx: &mut PgConnection, url: &str, source: &str) -> Result<()> {
    let (count, tokens): (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(length), 0)::bigint FROM rag_chunks WHERE source = $1",
    )
    .bind(source)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_err(url))?;
    sqlx::query("DELETE FROM rag_chunks WHERE source = $1")
        .bind(source)
        .execute(&mut *tx)
        .await
        .map_err(db_err(url))?;
    sqlx::query(
        "UPDATE rag_meta SET chunk_count = chunk_count - $1, token_count = token_count - $2
         WHERE id = 1",
    )
    .bind(count)
    .bind(tokens)
    .execute(&mut *tx)
    .await
    .map_err(db_err(url))?;
    Ok(())
}

async fn upsert(
    conn: &mut PgConnection,
    url: &str,
    source: &str,
    hash: &str,
    chunks: &[NewChunk],
) -> Result<()> {
    let Some(dim) = read_info(&mut *conn, url).await?.map(|i| i.dim) else {
        return Err(RagError::NoInfo {
            store: url.to_string(),
        });
    };
    check_chunks(url, dim, source, hash, chunks)?;
    let mut tx = conn.begin().await.map_err(db_err(url))?;
    let result = replace_document(&mut tx, url, source, hash, chunks).await;
    finish(tx, url, result).await
}

async fn replace_document(
    tx: &mut PgConnection,
    url: &str,
    source: &str,
    hash: &str,
    chunks: &[NewChunk],
) -> Result<()> {
    lock_meta(&mut *tx, url).await?;
    remove_chunks(&mut *tx, url, source).await?;
    sqlx::query(
        "INSERT INTO rag_documents (source, hash) VALUES ($1, $2)
         ON CONFLICT (source) DO UPDATE SET hash = EXCLUDED.hash",
    )
    .bind(source)
    .bind(hash)
    .execute(&mut *tx)
    .await
    .map_err(db_err(url))?;
    let mut total_tokens: i64 = 0;
    for chunk in chunks {
        let mut counts: BTreeMap<String, i32> = BTreeMap::new();
        let mut length: i32 = 0;
        for term in keyword_terms(&chunk.text).into_iter().map(index_term) {
            length = length.saturating_add(1);
            let tf = counts.entry(term).or_insert(0);
            *tf = tf.saturating_add(1);
        }
        total_tokens += i64::from(length);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO rag_chunks
                (source, ordinal, start_byte, end_byte, text, length, embedding)
             VALUES ($1, $2, $3, $4, $5, $6, $7::real[]::vector)
             RETURNING id",
        )
        .bind(source)
        .bind(to_i64(chunk.ordinal))
        .bind(to_i64(chunk.start))
        .bind(to_i64(chunk.end))
        .bind(&chunk.text)
        .bind(length)
        .bind(&chunk.embedding)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err(url))?;
        let (terms, tfs): (Vec<String>, Vec<i32>) = counts.into_iter().unzip();
        sqlx::query(
            "INSERT INTO rag_terms (chunk_id, term, tf)
             SELECT $1, u.term, u.tf FROM unnest($2::text[], $3::integer[]) AS u(term, tf)",
        )
        .bind(id)
        .bind(&terms)
        .bind(&tfs)
        .execute(&mut *tx)
        .await
        .map_err(db_err(url))?;
    }
    sqlx::query(
        "UPDATE rag_meta SET chunk_count = chunk_count + $1, token_count = token_count + $2
         WHERE id = 1",
    )
    .bind(to_i64(chunks.len()))
    .bind(total_tokens)
    .execute(&mut *tx)
    .await
    .map_err(db_err(url))?;
    Ok(())
}

async fn document_hash(conn: &mut PgConnection, url: &str, source: &str) -> Result<Option<String>> {
    sqlx::query_scalar("SELECT hash FROM rag_documents WHERE source = $1")
        .bind(source)
        .fetch_optional(conn)
        .await
        .map_err(db_err(url))
}

async fn delete(conn: &mut PgConnection, url: &str, source: &str) -> Result<bool> {
    let mut tx = conn.begin().await.map_err(db_err(url))?;
    let result = remove_document(&mut tx, url, source).await;
    finish(tx, url, result).await
}

async fn remove_document(tx: &mut PgConnection, url: &str, source: &str) -> Result<bool> {
    let has_chunks = lock_meta(&mut *tx, url).await?.is_some();
    if has_chunks {
        remove_chunks(&mut *tx, url, source).await?;
    }
    let deleted = sqlx::query("DELETE FROM rag_documents WHERE source = $1")
        .bind(source)
        .execute(&mut *tx)
        .await
        .map_err(db_err(url))?
        .rows_affected();
    Ok(deleted > 0)
}

async fn documents(conn: &mut PgConnection, url: &str) -> Result<Vec<DocumentInfo>> {
    let sql = if read_info(&mut *conn, url).await?.is_some() {
        "SELECT d.source, d.hash, count(c.id)
         FROM rag_documents d LEFT JOIN rag_chunks c ON c.source = d.source
         GROUP BY d.source, d.hash
         ORDER BY d.source COLLATE \"C\""
    } else {
        "SELECT source, hash, 0::bigint FROM rag_documents ORDER BY source COLLATE \"C\""
    };
    let rows: Vec<(String, String, i64)> = sqlx::query_as(sql)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err(url))?;
    Ok(rows
        .into_iter()
        .map(|(source, hash, chunks)| DocumentInfo {
            source,
            hash,
            chunks: to_usize(chunks),
        })
        .collect())
}

fn hit_from_row(row: &sqlx::postgres::PgRow, score: f64) -> std::result::Result<Hit, sqlx::Error> {
    Ok(Hit {
        source: row.try_get(0)?,
        ordinal: to_usize(row.try_get(1)?),
        start: to_usize(row.try_get(2)?),
        end: to_usize(row.try_get(3)?),
        text: row.try_get(4)?,
        score: score as f32,
    })
}

async fn vector_search(
    conn: &mut PgConnection,
    url: &str,
    query: &[f32],
    k: usize,
) -> Result<Vec<Hit>> {
    let Some(info) = read_info(&mut *conn, url).await? else {
        return Ok(Vec::new());
    };
    check_query(url, info.dim, query)?;
    if k == 0 {
        return Ok(Vec::new());
    }
    let mut tx = conn.begin().await.map_err(db_err(url))?;
    let result = nearest(&mut tx, url, query, k).await;
    finish(tx, url, result).await
}

/// The `k` nearest chunks, best first, ties by (source, ordinal).
///
/// The query orders by distance alone, so that the planner can use the HNSW
/// index; it returns equal distances in no defined order, so rows are fetched
/// until the k-th distance is not repeated past the end, then sorted here.
async fn nearest(tx: &mut PgConnection, url: &str, query: &[f32], k: usize) -> Result<Vec<Hit>> {
    let mut fetch = k;
    loop {
        // The index returns at most ef_search rows.
        sqlx::query("SELECT set_config('hnsw.ef_search', $1, true)")
            .bind(fetch.clamp(40, 1000).to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err(url))?;
        let rows = sqlx::query(
            "SELECT source, ordinal, start_byte, end_byte, text,
                    embedding <=> $1::real[]::vector AS distance
             FROM rag_chunks
             ORDER BY distance
             LIMIT $2",
        )
        .bind(query)
        .bind(to_i64(fetch))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err(url))?;
        let mut near = rows
            .iter()
            .map(|row| {
                let distance: f64 = row.try_get(5)?;
                Ok((hit_from_row(row, 1.0 - distance)?, distance))
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
            .map_err(db_err(url))?;
        near.sort_by(|(a, da), (b, db)| {
            da.total_cmp(db)
                .then_with(|| a.source.cmp(&b.source))
                .then_with(|| a.ordinal.cmp(&b.ordinal))
        });
        let tie_cut = near.len() == fetch && near[fetch - 1].1 == near[k - 1].1;
        if tie_cut && fetch < usize::MAX / 2 {
            fetch *= 2;
            continue;
        }
        let mut hits: Vec<Hit> = near.into_iter().take(k).map(|(hit, _)| hit).collect();
        sort_hits(&mut hits);
        return Ok(hits);
    }
}

async fn keyword_search(
    conn: &mut PgConnection,
    url: &str,
    query: &str,
    k: usize,
) -> Result<Vec<Hit>> {
    let terms: Vec<String> = query_terms(query)
        .into_iter()
        .map(index_term)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if terms.is_empty() || k == 0 || read_info(&mut *conn, url).await?.is_none() {
        return Ok(Vec::new());
    }
    // Only the postings of the query's words are read (`matched`); terms are
    // summed in a fixed order so that equal chunks score exactly equal.
    let rows = sqlx::query(
        "WITH q AS (SELECT DISTINCT unnest($1::text[]) AS term),
         stats AS (
            SELECT chunk_count::float8 AS n,
                   greatest(token_count::float8 / greatest(chunk_count, 1), 1e-9) AS avgdl
            FROM rag_meta WHERE id = 1
         ),
         matched AS MATERIALIZED (
            SELECT t.chunk_id, t.term, t.tf FROM q JOIN rag_terms t ON t.term = q.term
         ),
         df AS (
            SELECT term, count(*)::float8 AS n_hit FROM matched GROUP BY term
         ),
         scored AS (
            SELECT m.chunk_id,
                   sum(
                       greatest(ln((s.n - df.n_hit + 0.5) / (df.n_hit + 0.5)), 1e-6)
                       * (m.tf * ($3 + 1)) / (m.tf + $3 * (1 - $4 + $4 * c.length / s.avgdl))
                       ORDER BY m.term
                   ) AS score
            FROM matched m
            JOIN df ON df.term = m.term
            JOIN rag_chunks c ON c.id = m.chunk_id
            CROSS JOIN stats s
            GROUP BY m.chunk_id
         )
         SELECT c.source, c.ordinal, c.start_byte, c.end_byte, c.text, scored.score
         FROM scored JOIN rag_chunks c ON c.id = scored.chunk_id
         ORDER BY scored.score DESC, c.source COLLATE \"C\", c.ordinal
         LIMIT $2",
    )
    .bind(&terms)
    .bind(to_i64(k))
    .bind(BM25_K1)
    .bind(BM25_B)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err(url))?;
    let mut hits = rows
        .iter()
        .map(|row| {
            let score: f64 = row.try_get(5)?;
            hit_from_row(row, score)
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(db_err(url))?;
    sort_hits(&mut hits);
    Ok(hits)
}

/// Runs one of the async functions above on the store's connection.
macro_rules! blocking {
    ($store:expr, $f:ident($($arg:expr),*)) => {{
        let store = $store;
        let mut guard = store.lock();
        let conn = store.conn(&mut guard)?;
        store.rt.block_on($f(conn, &store.url $(, $arg)*))
    }};
}

impl Store for PgStore {
    fn info(&self) -> Result<Option<StoreInfo>> {
        blocking!(self, read_info())
    }

    fn ensure_info(&mut self, info: &StoreInfo) -> Result<()> {
        blocking!(self, ensure_info(info))
    }

    fn document_hash(&self, source: &str) -> Result<Option<String>> {
        blocking!(self, document_hash(source))
    }

    fn upsert_document(&mut self, source: &str, hash: &str, chunks: &[NewChunk]) -> Result<()> {
        blocking!(self, upsert(source, hash, chunks))
    }

    fn delete_document(&mut self, source: &str) -> Result<bool> {
        blocking!(self, delete(source))
    }

    fn documents(&self) -> Result<Vec<DocumentInfo>> {
        blocking!(self, documents())
    }

    fn vector_search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        blocking!(self, vector_search(query, k))
    }

    fn keyword_search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        blocking!(self, keyword_search(query, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_credentials() {
        assert_eq!(
            display_url("postgres://me:s3cret@db.example:5433/docs?sslmode=disable&password=x"),
            "postgres://db.example:5433/docs"
        );
        assert_eq!(
            display_url("postgresql://u:pa/ss@w@ord@host/db"),
            "postgresql://host/db"
        );
        assert_eq!(display_url("postgres://host"), "postgres://host");
        assert!(is_postgres_url("PostgreSQL://x"));
        assert!(is_postgres_url("postgres://x"));
        assert!(!is_postgres_url("docs.db"));
        assert!(!is_postgres_url("postgres.db"));
    }
}
