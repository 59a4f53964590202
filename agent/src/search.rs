//! The search tool: the RAG store's hybrid search, its chunks numbered for citation.
use std::sync::Mutex;

use llama_rag::pipeline::{self, SearchMode};
use llama_rag::Store;
use llama_runtime::Embedder;
use serde_json::{json, Value};

use crate::error::ToolError;
use crate::tool::Tool;

/// A chunk the search tool has shown the model, under its citation number.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Source {
    /// What `[n]` in an answer refers to, from 1.
    pub n: usize,
    /// The document it comes from.
    pub source: String,
    /// The chunk's position in that document.
    pub ordinal: usize,
    pub start: usize,
    pub end: usize,
    pub text: String,
}

/// Searches a store. Chunks are numbered in the order the model first sees them, the
/// same chunk keeping its number across searches, so `[n]` means one thing in the
/// whole run.
pub struct Search {
    store: Mutex<(Box<dyn Store>, Embedder)>,
    k: usize,
    sources: Mutex<Vec<Source>>,
}

impl Search {
    /// Searches `store` with `embedder` (the model the store was built with), showing
    /// `k` chunks a call.
    pub fn new(store: Box<dyn Store>, embedder: Embedder, k: usize) -> Search {
        Search {
            store: Mutex::new((store, embedder)),
            k: k.max(1),
            sources: Mutex::new(Vec::new()),
        }
    }

    /// Every chunk shown so far, by number.
    pub fn sources(&self) -> Vec<Source> {
        self.sources.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Tool for Search {
    fn name(&self) -> &str {
        "search"
    }

    fn description(&self) -> &str {
        "Searches the document store and returns the best passages, each numbered [n] \
         with its source. Cite the numbers of the passages you use."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "query": { "type": "string", "description": "What to look for" }
            },
            "required": ["query"]
        })
    }

    fn call(&self, arguments: &Value) -> Result<String, ToolError> {
        let query = arguments
            .get("query")
            .and_then(Value::as_str)
            .ok_or_else(|| ToolError::Arguments("`query` must be a string".into()))?;
        let hits = {
            // A call abandoned by a timeout may still hold the store.
            let guard = self
                .store
                .try_lock()
                .map_err(|_| ToolError::Failed("the store is busy".into()))?;
            let (store, embedder) = &*guard;
            pipeline::search(store.as_ref(), embedder, query, self.k, SearchMode::Hybrid)
                .map_err(|e| ToolError::Failed(e.to_string()))?
        };
        if hits.is_empty() {
            return Ok("No passage matches.".into());
        }
        let mut sources = self
            .sources
            .lock()
            .map_err(|_| ToolError::Failed("the source list is unusable".into()))?;
        let mut out = String::new();
        for hit in hits {
            let n = match sources
                .iter()
                .find(|s| s.source == hit.source && s.ordinal == hit.ordinal)
            {
                Some(s) => s.n,
                None => {
                    let n = sources.len() + 1;
                    sources.push(Source {
                        n,
                        source: hit.source.clone(),
                        ordinal: hit.ordinal,
                        start: hit.start,
                        end: hit.end,
                        text: hit.text.clone(),
                    });
                    n
                }
            };
            out.push_str(&format!(
                "[{n}] (from {})\n{}\n\n",
                source_label(&hit.source),
                hit.text.trim()
            ));
        }
        Ok(out.trim_end().to_string())
    }
}

/// A document's file name, which is what a reader needs to see in a citation.
fn source_label(source: &str) -> &str {
    std::path::Path::new(source)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(source)
}
