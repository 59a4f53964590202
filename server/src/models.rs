//! The models one server holds, by name: loaded on first use in the background
//! (requests for other models are served meanwhile), unloaded least recently used
//! first when past `--max-models` or the memory budget, never while a request holds
//! them.
//!
//! A request holds its model through a [`Lease`] (an `Arc` of the loaded model): a
//! model is idle exactly when the registry's reference is the only one, so "in
//! flight" needs no counter that could drift from the truth.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::error::ApiError;
use crate::state::Loaded;

/// One model the server may serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// The name requests use in their `model` field.
    pub name: String,
    /// A `.gguf` file or an HF model directory.
    pub path: PathBuf,
    /// The chat template to use over the file's own: a built-in name or a Jinja
    /// file (in a models directory, a `NAME.jinja` sidecar file beside the model).
    pub chat_template: Option<String>,
}

/// Loads and starts one model (on a blocking thread).
pub type LoadFn = dyn Fn(&ModelEntry) -> Result<Loaded, String> + Send + Sync;

/// How many models, and how much memory, may be loaded at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub max_models: Option<usize>,
    /// Bytes of weights and KV budgets of the loaded models together.
    pub memory_budget: Option<u64>,
}

/// Where a model stands.
#[derive(Clone)]
enum Phase {
    Unloaded,
    /// Loading on a blocking thread; the channel says when it is done.
    Loading(watch::Receiver<bool>),
    Ready(Arc<Loaded>),
    /// The load failed; the error is kept until the file changes.
    Failed(String),
}

impl Phase {
    fn word(&self) -> &'static str {
        match self {
            Phase::Unloaded => "unloaded",
            Phase::Loading(_) => "loading",
            Phase::Ready(_) => "loaded",
            Phase::Failed(_) => "failed",
        }
    }
}

struct Slot {
    entry: ModelEntry,
    phase: Phase,
    last_used: Instant,
    /// What the model holds (or is expected to hold) while loaded or loading.
    bytes: u64,
    /// The file's size and modification time when last seen, to notice a change.
    stamp: Option<(u64, SystemTime)>,
    /// Listed by `--models-dir` (rescanned) rather than named by `--model`.
    from_dir: bool,
}

/// A model held by a request: it is not unloaded while any lease lives.
pub struct Lease {
    model: Arc<Loaded>,
    registry: Arc<Registry>,
}

impl std::ops::Deref for Lease {
    type Target = Loaded;

    fn deref(&self) -> &Loaded {
        &self.model
    }
}

impl Clone for Lease {
    fn clone(&self) -> Self {
        Lease {
            model: self.model.clone(),
            registry: self.registry.clone(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Waiting loads may now find an idle model to unload.
        self.registry.changed.notify_waiters();
    }
}

/// Every model of the server and what each is doing.
pub struct Registry {
    slots: Mutex<BTreeMap<String, Slot>>,
    /// Signalled when a lease ends or a load finishes.
    changed: Notify,
    limits: Limits,
    load: Arc<LoadFn>,
    /// One model named on the command line: every request reaches it, whatever its
    /// `model` field says (as a single-model server always has).
    single: std::sync::atomic::AtomicBool,
    dir: Option<PathBuf>,
    /// How long a request may wait for room to load its model.
    wait: Duration,
}

/// The `model` field's 404, in the words every route uses.
fn not_found(name: &str, known: &[String]) -> ApiError {
    ApiError {
        code: Some("model_not_found"),
        ..ApiError::field(
            "model",
            format!(
                "the model `{name}` does not exist; this server has {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        )
    }
    .with_status(StatusCode::NOT_FOUND)
}

fn failed(name: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the model `{name}` failed to load: {why}"),
    )
    .with_code("model_load_failed")
}

impl Registry {
    /// A registry of `entries` (and of what `dir` holds, rescanned as it changes).
    pub fn new(
        entries: Vec<ModelEntry>,
        dir: Option<PathBuf>,
        limits: Limits,
        wait: Duration,
        load: Arc<LoadFn>,
    ) -> Arc<Registry> {
        let single = dir.is_none() && entries.len() == 1;
        let mut slots = BTreeMap::new();
        for entry in entries {
            slots.insert(entry.name.clone(), Slot::new(entry, false));
        }
        let registry = Arc::new(Registry {
            slots: Mutex::new(slots),
            changed: Notify::new(),
            limits,
            load,
            single: single.into(),
            dir,
            wait,
        });
        registry.rescan();
        registry
    }

    fn slots(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        // A panic while the lock was held leaves the map itself consistent (every
        // change is one insert or one field store).
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `loaded` as the one model of a server built in process.
    pub fn insert_ready(&self, loaded: Loaded) {
        let name = loaded.name.clone();
        let entry = ModelEntry {
            name: name.clone(),
            path: loaded.engine.model().path.clone(),
            chat_template: None,
        };
        let mut slot = Slot::new(entry, false);
        slot.bytes = loaded.bytes();
        slot.phase = Phase::Ready(Arc::new(loaded));
        let mut slots = self.slots();
        slots.clear();
        slots.insert(name, slot);
        self.single
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether one model serves every request.
    pub fn is_single(&self) -> bool {
        self.single.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<String> {
        self.slots().keys().cloned().collect()
    }

    /// The loaded models (for shutdown and metrics).
    pub fn loaded(&self) -> Vec<(String, Arc<Loaded>)> {
        self.slots()
            .iter()
            .filter_map(|(n, s)| match &s.phase {
                Phase::Ready(m) => Some((n.clone(), m.clone())),
                _ => None,
            })
            .collect()
    }

    /// The model a request names (`None`: the field is absent), loading it first if
    /// need be; waits while it loads, and for room to load it.
    pub async fn get(self: &Arc<Self>, name: Option<&str>) -> Result<Lease, ApiError> {
        let deadline = Instant::now() + self.wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waiting = {
                let mut slots = self.slots();
                let key = self.resolve(&slots, name)?;
                let Some(slot) = slots.get_mut(&key) else {
                    return Err(not_found(&key, &[]));
                };
                match slot.phase.clone() {
                    Phase::Ready(model) => {
                        slot.last_used = Instant::now();
                        return Ok(Lease {
                            model,
                            registry: self.clone(),
                        });
                    }
                    Phase::Failed(why) => return Err(failed(&key, &why)),
                    // A single model loads at start, and until it has loaded the
                    // server answers 503 (as `/health` does) rather than hold requests.
                    Phase::Loading(_) if self.is_single() => {
                        return Err(ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the model is still loading",
                        ))
                    }
                    Phase::Loading(rx) => Some(rx),
                    Phase::Unloaded => {
                        if self.make_room(&mut slots, &key) {
                            self.start_load(&mut slots, &key);
                            // Its channel is read on the next turn.
                            continue;
                        }
                        None
                    }
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no room to load the model `{}`: the loaded models are all in use",
                        name.unwrap_or_default()
                    ),
                ));
            }
            match waiting {
                Some(mut rx) => {
                    let _ = tokio::time::timeout(left, rx.wait_for(|done| *done)).await;
                }
                // No room: wait for a lease to end. The timeout covers a release
                // between the check and the wait's registration.
                None => {
                    let _ =
                        tokio::time::timeout(left.min(Duration::from_millis(250)), notified).await;
                }
            }
        }
    }

    /// The slot a request's `model` names.
    fn resolve(
        &self,
        slots: &BTreeMap<String, Slot>,
        name: Option<&str>,
    ) -> Result<String, ApiError> {
        if self.is_single() {
            if let Some(k) = slots.keys().next() {
                return Ok(k.clone());
            }
        }
        let known: Vec<String> = slots.keys().cloned().collect();
        match name.filter(|n| !n.is_empty()) {
            Some(n) if slots.contains_key(n) => Ok(n.to_string()),
            Some(n) => Err(not_found(n, &known)),
            None => Err(ApiError::field(
                "model",
                format!(
                    "`model` is required: this server has {}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Unloads idle models, least recently used first, until `key` fits the limits;
    /// false when models in use leave no room.
    fn make_room(&self, slots: &mut BTreeMap<String, Slot>, key: &str) -> bool {
        let need = slots.get(key).map_or(0, |s| s.bytes);
        loop {
            let held: Vec<(&String, &Slot)> = slots
                .iter()
                .filter(|(k, s)| {
                    k.as_str() != key && matches!(s.phase, Phase::Ready(_) | Phase::Loading(_))
                })
                .collect();
            let count_ok = self.limits.max_models.is_none_or(|m| held.len() < m);
            let bytes: u64 = held.iter().map(|(_, s)| s.bytes).sum();
            let bytes_ok = self
                .limits
                .memory_budget
                .is_none_or(|b| held.is_empty() || bytes + need <= b);
            if count_ok && bytes_ok {
                return true;
            }
            let victim = held
                .iter()
                .filter(|(_, s)| matches!(&s.phase, Phase::Ready(m) if Arc::strong_count(m) == 1))
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| (*k).clone());
            let Some(victim) = victim else {
                return false;
            };
            if let Some(s) = slots.get_mut(&victim) {
                if let Phase::Ready(m) = std::mem::replace(&mut s.phase, Phase::Unloaded) {
                    crate::log(&format!(
                        "unloading the model `{victim}` (least recently used)"
                    ));
                    drop_model(m);
                }
            }
        }
    }

    /// Marks `key` loading and loads it on a blocking thread.
    fn start_load(self: &Arc<Self>, slots: &mut BTreeMap<String, Slot>, key: &str) {
        let Some(slot) = slots.get_mut(key) else {
            return;
        };
        let (tx, rx) = watch::channel(false);
        slot.phase = Phase::Loading(rx);
        slot.stamp = stamp(&slot.entry.path);
        let entry = slot.entry.clone();
        let me = self.clone();
        let load = self.load.clone();
        crate::log(&format!(
            "loading the model `{}` from {}",
            entry.name,
            entry.path.display()
        ));
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&entry)))
                .unwrap_or_else(|_| Err("the loader panicked".into()));
            {
                let mut slots = me.slots();
                if let Some(slot) = slots.get_mut(&entry.name) {
                    match result {
                        Ok(loaded) => {
                            crate::log(&format!(
                                "model `{}` loaded in {:.1} s",
                                entry.name,
                                started.elapsed().as_secs_f64()
                            ));
                            slot.bytes = loaded.bytes();
                            slot.last_used = Instant::now();
                            slot.phase = Phase::Ready(Arc::new(loaded));
                        }
                        Err(why) => {
                            crate::log(&format!("model `{}` failed to load: {why}", entry.name));
                            slot.phase = Phase::Failed(why);
                        }
                    }
                }
            }
            let _ = tx.send(true);
            me.changed.notify_waiters();
        });
    }

    /// Loads a model now (`POST /models/load`), waiting until it is ready.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        {
            // A failed model is tried again on an explicit load.
            let mut slots = self.slots();
            if let Some(s) = slots.get_mut(name) {
                if matches!(s.phase, Phase::Failed(_)) {
                    s.phase = Phase::Unloaded;
                }
            }
        }
        self.get(Some(name)).await.map(drop)
    }

    /// Unloads a model (`POST /models/unload`); 409 while requests use it.
    pub fn unload(&self, name: &str) -> Result<bool, ApiError> {
        let mut slots = self.slots();
        let known: Vec<String> = slots.keys().cloned().collect();
        let Some(slot) = slots.get_mut(name) else {
            return Err(not_found(name, &known));
        };
        match &slot.phase {
            Phase::Ready(m) if Arc::strong_count(m) > 1 => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "the model `{name}` has {} requests in flight; unload it when they end",
                    Arc::strong_count(m) - 1
                ),
            )),
            Phase::Ready(_) => {
                if let Phase::Ready(m) = std::mem::replace(&mut slot.phase, Phase::Unloaded) {
                    crate::log(&format!("unloading the model `{name}`"));
                    drop(slots);
                    drop_model(m);
                }
                self.changed.notify_waiters();
                Ok(true)
            }
            Phase::Loading(_) => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("the model `{name}` is loading; unload it once it has loaded"),
            )),
            Phase::Unloaded | Phase::Failed(_) => Ok(false),
        }
    }

    /// Each model as `/v1/models` lists it, with its state as an extension field.
    pub fn list(&self, created: u64, parallel: usize) -> Vec<Value> {
        self.slots()
            .iter()
            .map(|(name, s)| {
                let mut o = json!({
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "llama.rs",
                    "status": { "value": s.phase.word() },
                });
                match &s.phase {
                    Phase::Ready(m) => {
                        o["meta"] = json!({
                            "n_ctx": m.context,
                            "n_vocab": m.vocab,
                            "parallel": parallel,
                            "arch": m.engine.model().arch.to_string(),
                            "bytes": s.bytes,
                            "in_flight": Arc::strong_count(m) - 1,
                        });
                    }
                    Phase::Failed(why) => o["status"]["error"] = json!(why),
                    _ => {}
                }
                o
            })
            .collect()
    }

    /// Whether `name` is a model of this server (any name is, for a single model).
    pub fn knows(&self, name: &str) -> bool {
        self.is_single() || self.slots().contains_key(name)
    }

    /// Adds models new in the directory, drops those whose files are gone (unless in
    /// use), and forgets a failed load whose file changed since.
    pub fn rescan(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let found = match scan_dir(dir) {
            Ok(found) => found,
            Err(e) => {
                crate::log(&format!(
                    "reading the models directory {}: {e}",
                    dir.display()
                ));
                return;
            }
        };
        let mut slots = self.slots();
        let mut gone = Vec::new();
        for (name, slot) in slots.iter_mut() {
            if !slot.from_dir {
                continue;
            }
            match found.iter().find(|e| &e.name == name) {
                None => gone.push(name.clone()),
                Some(e) => {
                    if matches!(slot.phase, Phase::Failed(_)) && stamp(&e.path) != slot.stamp {
                        slot.phase = Phase::Unloaded;
                    }
                    slot.entry.chat_template = e.chat_template.clone();
                }
            }
        }
        for name in gone {
            let idle = slots.get(&name).is_some_and(|s| match &s.phase {
                Phase::Ready(m) => Arc::strong_count(m) == 1,
                Phase::Loading(_) => false,
                _ => true,
            });
            if idle {
                crate::log(&format!("the model `{name}` left the models directory"));
                if let Some(Slot {
                    phase: Phase::Ready(m),
                    ..
                }) = slots.remove(&name)
                {
                    drop_model(m);
                }
            }
        }
        for entry in found {
            if !slots.contains_key(&entry.name) {
                crate::log(&format!(
                    "model `{}` found in the models directory",
                    entry.name
                ));
                slots.insert(entry.name.clone(), Slot::new(entry, true));
            }
        }
    }

    /// Rescans the directory every `every` for as long as the registry lives.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        if self.dir.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                tokio::time::sleep(every).await;
                let Some(me) = weak.upgrade() else {
                    return;
                };
                let Some(dir) = &me.dir else {
                    return;
                };
                // A directory's modification time changes when an entry is added,
                // removed or renamed; a file replaced in place is noticed too, by its
                // own stamp, when a failed load is retried.
                let now = dir_stamp(dir);
                if now != last {
                    last = now;
                    let me = me.clone();
                    let _ = tokio::task::spawn_blocking(move || me.rescan()).await;
                }
            }
        });
    }

    /// Loads a model in the background without waiting (the single model at start).
    pub fn preload(self: &Arc<Self>, name: &str) {
        let mut slots = self.slots();
        if matches!(slots.get(name).map(|s| &s.phase), Some(Phase::Unloaded))
            && self.make_room(&mut slots, name)
        {
            self.start_load(&mut slots, name);
        }
    }

    /// Waits for a model's load to end: its error if it failed.
    pub async fn loaded_or_failed(self: &Arc<Self>, name: &str) -> Result<(), String> {
        loop {
            let rx = {
                let slots = self.slots();
                match slots.get(name).map(|s| &s.phase) {
                    Some(Phase::Ready(_)) => return Ok(()),
                    Some(Phase::Failed(why)) => return Err(why.clone()),
                    Some(Phase::Loading(rx)) => rx.clone(),
                    Some(Phase::Unloaded) | None => {
                        return Err(format!("the model `{name}` is not loading"))
                    }
                }
            };
            let mut rx = rx;
            let _ = rx.wait_for(|done| *done).await;
        }
    }
}

impl Slot {
    fn new(entry: ModelEntry, from_dir: bool) -> Slot {
        let bytes = model_bytes(&entry.path);
        Slot {
            entry,
            phase: Phase::Unloaded,
            last_used: Instant::now(),
            bytes,
            stamp: None,
            from_dir,
        }
    }
}

/// Drops a model on a thread of its own: its engine thread is joined, which must not
/// hold up the registry's lock or an async worker.
fn drop_model(m: Arc<Loaded>) {
    let _ = std::thread::Builder::new()
        .name("unload".into())
        .spawn(move || drop(m));
}

/// The bytes of a model's weights on disk: a file's size, or a directory's
/// safetensors files together.
pub fn model_bytes(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}

fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn dir_stamp(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir).ok()?.modified().ok()
}

/// The models of a directory: each `.gguf` file (named by its stem) and each
/// subdirectory holding a `config.json` (named by the directory), with a
/// `NAME.jinja` sidecar file as its chat template where there is one. Hidden and
/// partial files (`.part`, `.tmp`) are skipped.
pub fn scan_dir(dir: &Path) -> std::io::Result<Vec<ModelEntry>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if file_name.starts_with('.') {
            continue;
        }
        let name = if path.is_dir() {
            if !path.join("config.json").is_file() {
                continue;
            }
            file_name.to_string()
        } else if let Some(stem) = file_name.strip_suffix(".gguf") {
            stem.to_string()
        } else {
            continue;
        };
        let sidecar = dir.join(format!("{name}.jinja"));
        out.push(ModelEntry {
            name,
            path,
            chat_template: sidecar
                .is_file()
                .then(|| sidecar.to_string_lossy().into_owned()),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_lists_gguf_files_and_model_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.gguf"), b"x").unwrap();
        std::fs::write(dir.path().join("b.jinja"), b"{{ x }}").unwrap();
        std::fs::write(dir.path().join("a.gguf.part"), b"x").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("hf")).unwrap();
        std::fs::write(dir.path().join("hf/config.json"), b"{}").unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let found = scan_dir(dir.path()).unwrap();
        let names: Vec<&str> = found.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "hf"]);
        assert!(found[0]
            .chat_template
            .as_deref()
            .is_some_and(|t| t.ends_with("b.jinja")));
        assert_eq!(found[1].chat_template, None);
    }
}
