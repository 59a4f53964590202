//! Errors of the stores; every message is one line and names what is wrong.

/// What can go wrong with a store.
///
/// Stores are named by their SQLite path or by their PostgreSQL URL without
/// user name, password or parameters.
#[derive(thiserror::Error, Debug)]
pub enum RagError {
    /// Bad input to the pipeline: a file that is not text, an empty corpus, a query
    /// with nothing in it, options that do not fit.
    #[error("{0}")]
    Input(String),

    /// A SQLite call failed.
    #[error("store {path}: {message}")]
    Sqlite {
        /// The SQLite file.
        path: String,
        /// What SQLite said, on one line.
        message: String,
    },

    /// No connection to a PostgreSQL server could be made.
    #[error("cannot reach the database at {url}: {message}")]
    Connect {
        /// The database, without credentials.
        url: String,
        /// Why, on one line.
        message: String,
    },

    /// A PostgreSQL call failed.
    #[error("database {url}: {message}")]
    Postgres {
        /// The database, without credentials.
        url: String,
        /// What PostgreSQL said, on one line.
        message: String,
    },

    /// The store was made with another embedding model.
    #[error("store {store} was made with model {stored_model} ({stored_dim} dims); this is model {model} ({dim} dims)")]
    ModelMismatch {
        /// The store.
        store: String,
        /// The model it was made with.
        stored_model: String,
        /// The width of that model's vectors.
        stored_dim: usize,
        /// The model asked for.
        model: String,
        /// The width asked for.
        dim: usize,
    },

    /// The store was made with the same model name but another vector width.
    #[error("store {store} was made with model {stored_model} ({stored_dim} dims); this is model {model} ({dim} dims)")]
    DimensionMismatch {
        /// The store.
        store: String,
        /// The model it was made with.
        stored_model: String,
        /// The width of its vectors.
        stored_dim: usize,
        /// The model asked for.
        model: String,
        /// The width asked for.
        dim: usize,
    },

    /// A write came before [`crate::Store::ensure_info`] recorded a model.
    #[error("store {store} has no embedding model recorded yet (ensure_info first)")]
    NoInfo {
        /// The store.
        store: String,
    },

    /// A model description that cannot be stored.
    #[error("invalid embedding model for store {store}: {reason}")]
    InvalidInfo {
        /// The store.
        store: String,
        /// What is wrong.
        reason: String,
    },

    /// A chunk's vector has the wrong width.
    #[error("chunk {ordinal} of {document} has a {got}-dim vector; store {store} holds {expected}-dim vectors")]
    VectorWidth {
        /// The store.
        store: String,
        /// The document.
        document: String,
        /// The chunk.
        ordinal: usize,
        /// Its vector's width.
        got: usize,
        /// The store's width.
        expected: usize,
    },

    /// A chunk that cannot be stored for another reason.
    #[error("chunk {ordinal} of {document}: {reason}")]
    InvalidChunk {
        /// The document.
        document: String,
        /// The chunk.
        ordinal: usize,
        /// What is wrong.
        reason: String,
    },

    /// A query vector of the wrong width.
    #[error("query vector has {got} dims; store {store} holds {expected}-dim vectors")]
    QueryWidth {
        /// The store.
        store: String,
        /// The query's width.
        got: usize,
        /// The store's width.
        expected: usize,
    },

    /// A query vector that cannot be compared by cosine similarity.
    #[error("query vector: {reason}")]
    InvalidQuery {
        /// What is wrong.
        reason: String,
    },

    /// The store was written by a newer version of this crate.
    #[error("store {store} has schema version {found}; this build reads version {supported}")]
    SchemaVersion {
        /// The store.
        store: String,
        /// The version found.
        found: i64,
        /// The version this build writes and reads.
        supported: i64,
    },
}

/// Result of the store operations.
pub type Result<T> = std::result::Result<T, RagError>;

/// Joins the lines of a message into one.
pub(crate) fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}
