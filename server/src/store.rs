//! Stored responses of `/v1/responses`: one SQLite file in the server's state
//! directory (or in memory without one), each row scoped to the hash of the API key
//! that made it, expired by age and by count.
//!
//! A row keeps the response object as it was answered and the conversation up to and
//! including its output, in OpenAI's chat-message shape, so that a request naming it
//! as `previous_response_id` continues that conversation.
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("a stored response is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub id: String,
    /// The hash of the API key that made it (see [`scope`]).
    pub scope: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// The response object, as answered.
    pub response: Value,
    /// The conversation through this response's output, as chat messages (without
    /// `instructions`, which a follow-up does not inherit).
    pub history: Vec<Value>,
}

/// How long and how many responses are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_count: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_count: 10_000,
        }
    }
}

/// The file name of the database in the state directory.
pub const FILE: &str = "responses.sqlite3";

pub struct Store {
    conn: Mutex<Connection>,
    retention: Retention,
}

/// The scope of a request's key: a SHA-256 of it (the key itself is never stored),
/// or the empty scope for a request without one.
pub fn scope(key: Option<&str>) -> String {
    match key {
        None => String::new(),
        Some(k) => Sha256::digest(k.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}

impl Store {
    /// Opens (creating) the database in `dir`, or an in-memory one without a dir.
    pub fn open(dir: Option<&Path>, retention: Retention) -> Result<Store, StoreError> {
        let conn = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                    path: dir.to_path_buf(),
                    source,
                })?;
                let path = dir.join(FILE);
                let conn = Connection::open(&path).map_err(|source| StoreError::Open {
                    path: path.clone(),
                    source,
                })?;
                // Reading the journal mode back also tells whether the file is a
                // database at all.
                conn.query_row("PRAGMA journal_mode = WAL", [], |row| {
                    row.get::<_, String>(0)
                })
                .map_err(|source| StoreError::Open {
                    path: path.clone(),
                    source,
                })?;
                conn.pragma_update(None, "synchronous", "NORMAL")
                    .map_err(|source| StoreError::Open { path, source })?;
                conn
            }
            None => Connection::open_in_memory()?,
        };
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS responses (
                 id TEXT PRIMARY KEY,
                 scope TEXT NOT NULL,
                 created INTEGER NOT NULL,
                 response TEXT NOT NULL,
                 history TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS responses_created ON responses (created);",
        )?;
        let store = Store {
            conn: Mutex::new(conn),
            retention,
        };
        store.expire(crate::state::now())?;
        Ok(store)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each statement
        // is atomic), so the connection stays usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `r` (replacing a row of the same id), then drops what is past the
    /// retention.
    pub fn put(&self, r: &Stored) -> Result<(), StoreError> {
        let response = serde_json::to_string(&r.response)?;
        let history = serde_json::to_string(&r.history)?;
        self.conn().execute(
            "INSERT OR REPLACE INTO responses (id, scope, created, response, history)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![r.id, r.scope, r.created as i64, response, history],
        )?;
        self.expire(crate::state::now())
    }

    /// The response `id` if it exists, has not expired and belongs to `scope`.
    pub fn get(&self, scope: &str, id: &str) -> Result<Option<Stored>, StoreError> {
        let oldest = self.oldest(crate::state::now());
        let row = self
            .conn()
            .query_row(
                "SELECT created, response, history FROM responses
                 WHERE id = ?1 AND scope = ?2 AND created >= ?3",
                params![id, scope, oldest],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()?;
        let Some((created, response, history)) = row else {
            return Ok(None);
        };
        Ok(Some(Stored {
            id: id.to_string(),
            scope: scope.to_string(),
            created: created.max(0) as u64,
            response: serde_json::from_str(&response)?,
            history: serde_json::from_str(&history)?,
        }))
    }

    /// Deletes the response `id` of `scope`; whether there was one.
    pub fn delete(&self, scope: &str, id: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM responses WHERE id = ?1 AND scope = ?2",
            params![id, scope],
        )?;
        Ok(n > 0)
    }

    fn oldest(&self, now: u64) -> i64 {
        now.saturating_sub(self.retention.max_age.as_secs()) as i64
    }

    /// Drops responses older than the maximum age, then the oldest past the count.
    pub fn expire(&self, now: u64) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM responses WHERE created < ?1",
            params![self.oldest(now)],
        )?;
        conn.execute(
            "DELETE FROM responses WHERE rowid IN (
                 SELECT rowid FROM responses ORDER BY created DESC, rowid DESC
                 LIMIT -1 OFFSET ?1)",
            params![self.retention.max_count as i64],
        )?;
        Ok(())
    }

    /// Rows held (expired ones not yet dropped included).
    #[cfg(test)]
    fn len(&self) -> Result<usize, StoreError> {
        let n: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))?;
        Ok(n.max(0) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(id: &str, scope: &str, created: u64) -> Stored {
        Stored {
            id: id.into(),
            scope: scope.into(),
            created,
            response: json!({ "id": id }),
            history: vec![json!({ "role": "user", "content": "hi" })],
        }
    }

    #[test]
    fn a_row_is_read_back_only_in_its_scope() {
        let s = Store::open(None, Retention::default()).expect("store");
        let now = crate::state::now();
        let a = scope(Some("key-a"));
        s.put(&row("resp_1", &a, now)).expect("put");
        assert_eq!(
            s.get(&a, "resp_1").expect("get"),
            Some(row("resp_1", &a, now))
        );
        assert_eq!(s.get(&scope(Some("key-b")), "resp_1").expect("get"), None);
        assert_eq!(s.get(&scope(None), "resp_1").expect("get"), None);
        assert!(!s.delete(&scope(Some("key-b")), "resp_1").expect("delete"));
        assert!(s.delete(&a, "resp_1").expect("delete"));
        assert_eq!(s.get(&a, "resp_1").expect("get"), None);
    }

    #[test]
    fn scopes_are_hashes_not_keys() {
        let h = scope(Some("sesame"));
        assert_eq!(h.len(), 64);
        assert!(!h.contains("sesame"));
        assert_ne!(h, scope(Some("sesame2")));
        assert_eq!(scope(None), "");
    }

    #[test]
    fn rows_expire_by_age_and_by_count() {
        let retention = Retention {
            max_age: Duration::from_secs(100),
            max_count: 3,
        };
        let s = Store::open(None, retention).expect("store");
        let now = crate::state::now();
        // Older than the maximum age: not readable, and dropped at the next write.
        s.put(&row("old", "", now - 1000)).expect("put");
        assert_eq!(s.get("", "old").expect("get"), None);
        for i in 0..5 {
            s.put(&row(&format!("r{i}"), "", now - 50 + i))
                .expect("put");
        }
        assert_eq!(s.len().expect("len"), 3, "the count is kept");
        for (id, kept) in [("r0", false), ("r1", false), ("r2", true), ("r4", true)] {
            assert_eq!(s.get("", id).expect("get").is_some(), kept, "{id}");
        }
    }

    #[test]
    fn rows_survive_reopening_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = crate::state::now();
        {
            let s = Store::open(Some(dir.path()), Retention::default()).expect("store");
            s.put(&row("resp_kept", "k", now)).expect("put");
        }
        let s = Store::open(Some(dir.path()), Retention::default()).expect("reopen");
        assert_eq!(
            s.get("k", "resp_kept").expect("get"),
            Some(row("resp_kept", "k", now))
        );
    }
}
