//! The prompt cache on disk: KV caches of finished sequences kept in a directory, so
//! that a later request (after a restart too) that starts with the same tokens loads
//! their keys and values instead of running the prompt again.
//!
//! - An entry is one file: a magic, a JSON header (what made it, its tokens, its
//!   layers' shapes, a SHA-256 of each chunk of the payload), the header's own SHA-256,
//!   then the payload. A cache whose layers hold every position (host layers) is
//!   written in pages of [`KV_PAGE`] positions, each page one chunk, so a request that
//!   shares only the first pages of an entry reads and checks only those.
//! - Entries are keyed by everything that changes the values: the model's content
//!   (SHA-256 of its files, see [`model_digest`]), the cache type, the device and the
//!   compiled graph (its dump: architecture, config and passes). An entry made under
//!   another key is never used.
//! - Writes are atomic: a temporary file in the directory, fsync, rename, fsync of the
//!   directory. A file that is truncated, corrupted or foreign is skipped with one
//!   warning line (and a corrupted one of ours removed); a directory that cannot be
//!   written, or a full disk, turns the tier off with a warning: the service goes on
//!   from RAM only.
//! - The directory holds at most `budget` bytes of this key's entries; the least
//!   recently used go first (use is kept in the files' modification times, so the
//!   order survives a restart).
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use llama_graph::exec::LayerSnapshot;
use llama_graph::{KvCache, KvSnapshot, KvType, Program, KV_PAGE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::session::SessionState;

const MAGIC: &[u8; 8] = b"LLRSKV01";
const VERSION: u32 = 1;
/// Finished sequences waiting to be written, at most.
const QUEUE: usize = 4;
/// The largest header read: tokens of a whole context and a hash per page fit.
const MAX_HEADER: usize = 64 << 20;

/// Why an entry (or the directory) could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PromptCacheError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}")]
    Corrupt { path: String, what: String },
    #[error("{path}: made by {what}")]
    Foreign { path: String, what: String },
    #[error("{path}: the disk is full")]
    Full { path: String },
}

impl PromptCacheError {
    fn io(path: &Path, source: io::Error) -> Self {
        let path = path.display().to_string();
        if is_full(&source) {
            PromptCacheError::Full { path }
        } else {
            PromptCacheError::Io { path, source }
        }
    }

    fn corrupt(path: &Path, what: impl Into<String>) -> Self {
        PromptCacheError::Corrupt {
            path: path.display().to_string(),
            what: what.into(),
        }
    }
}

fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

type CacheResult<T> = std::result::Result<T, PromptCacheError>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything that changes the values an entry holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// SHA-256 of the model's files ([`model_digest`]).
    pub model: String,
    /// The KV cache type (`f32`, `f16`, …).
    pub cache_type: String,
    /// The device the values were computed on.
    pub device: String,
    /// SHA-256 of the compiled graph's dump.
    pub graph: String,
}

impl CacheKey {
    /// The key of an engine's values: its model's digest, cache type, device and graph.
    pub fn new(model: String, cache_type: KvType, device: &str, program: &Program) -> Self {
        CacheKey {
            model,
            cache_type: format!("{cache_type:?}").to_lowercase(),
            device: device.to_string(),
            graph: hex(&Sha256::digest(
                llama_graph::dump(program.graph()).as_bytes(),
            )),
        }
    }

    /// The key of `engine`'s values, its model being the file (or directory) at
    /// `model`; with `memo`, the model's digest is kept there (see [`model_digest`]).
    pub fn for_engine(
        engine: &crate::Engine,
        model: &Path,
        memo: Option<&Path>,
    ) -> CacheResult<CacheKey> {
        Ok(CacheKey::new(
            model_digest(model, memo)?,
            engine.cache_type(),
            &format!("{:?}", engine.device()),
            engine.program(),
        ))
    }

    /// A short digest of the whole key, the first part of its entries' file names.
    fn digest(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.model, &self.cache_type, &self.device, &self.graph] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex(&h.finalize()[..8])
    }

    /// What differs from `other`, in words (for the warning that skips an entry).
    fn difference(&self, other: &CacheKey) -> String {
        if self.model != other.model {
            format!(
                "another model ({}…)",
                &other.model[..other.model.len().min(12)]
            )
        } else if self.cache_type != other.cache_type {
            format!("a {} cache", other.cache_type)
        } else if self.device != other.device {
            format!("another device ({})", other.device)
        } else {
            "another graph (architecture, context or passes)".into()
        }
    }
}

/// SHA-256 of a model: the file's bytes, or for a directory, each regular file's name
/// and bytes in name order. Hashing a large model takes a while (about a second per
/// GB), so with `memo` (a directory) the digest is kept in `memo/models.json` under
/// the path, size and modification time of the files, and computed again only when
/// one of them changes.
pub fn model_digest(path: &Path, memo: Option<&Path>) -> CacheResult<String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(path)
            .map_err(|e| PromptCacheError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut stamp = String::new();
    for f in &files {
        let m = fs::metadata(f).map_err(|e| PromptCacheError::io(f, e))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let name = fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        stamp.push_str(&format!("{}|{}|{mtime}\n", name.display(), m.len()));
    }
    let memo_file = memo.map(|d| d.join("models.json"));
    let mut known: HashMap<String, String> = memo_file
        .as_ref()
        .and_then(|f| fs::read(f).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(d) = known.get(&stamp) {
        return Ok(d.clone());
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        if files.len() > 1 {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            h.update(name.unwrap_or_default().as_bytes());
            h.update([0]);
        }
        let mut file = File::open(f).map_err(|e| PromptCacheError::io(f, e))?;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| PromptCacheError::io(f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    let digest = hex(&h.finalize());
    if let Some(f) = memo_file {
        known.insert(stamp, digest.clone());
        if let Ok(text) = serde_json::to_vec(&known) {
            // Only a shortcut: a memo that cannot be written is computed again.
            let _ = write_atomic(&f, &[&text]);
        }
    }
    Ok(digest)
}

/// An entry's header.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    version: u32,
    key: CacheKey,
    /// Positions cached.
    len: usize,
    /// Each layer's rows and width (rows is `len` but for sliding-window rings).
    layers: Vec<[usize; 2]>,
    /// How values are stored: `f32` or `f16` (chosen only when every value is one).
    element: String,
    /// Positions per chunk when every layer holds `len` rows; 0: one chunk.
    page: usize,
    tokens: Vec<u32>,
    /// SHA-256 of each chunk.
    chunks: Vec<String>,
    /// What the writer keeps beside (a chat's messages).
    #[serde(default)]
    meta: serde_json::Value,
}

impl Header {
    fn element_size(&self) -> usize {
        if self.element == "f16" {
            2
        } else {
            4
        }
    }

    /// Positions of chunk `c` (for a paged entry).
    fn chunk_rows(&self, c: usize) -> std::ops::Range<usize> {
        let start = c * self.page;
        start..(start + self.page).min(self.len)
    }

    fn chunk_bytes(&self, c: usize) -> usize {
        let per_value = self.element_size() * 2;
        if self.page == 0 {
            self.layers.iter().map(|[r, w]| r * w * per_value).sum()
        } else {
            let rows = self.chunk_rows(c).len();
            self.layers.iter().map(|[_, w]| rows * w * per_value).sum()
        }
    }
}

/// Encodes `snap` as chunks (see [`Header`]); `paged` when every layer holds `len`
/// rows.
fn encode(snap: &KvSnapshot, f16: bool, paged: bool) -> Vec<Vec<u8>> {
    let put = |out: &mut Vec<u8>, xs: &[f32]| {
        if f16 {
            out.extend(
                xs.iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes()),
            );
        } else {
            out.extend(xs.iter().flat_map(|x| x.to_le_bytes()));
        }
    };
    if !paged {
        let mut out = Vec::new();
        for l in &snap.layers {
            put(&mut out, &l.keys);
            put(&mut out, &l.values);
        }
        return vec![out];
    }
    (0..snap.len.div_ceil(KV_PAGE))
        .map(|p| {
            let rows = p * KV_PAGE..((p + 1) * KV_PAGE).min(snap.len);
            let mut out = Vec::new();
            for l in &snap.layers {
                let r = rows.start * l.width..rows.end * l.width;
                put(&mut out, &l.keys[r.clone()]);
                put(&mut out, &l.values[r]);
            }
            out
        })
        .collect()
}

/// Writes `parts` to `path` atomically: a temporary file beside it, fsync, rename,
/// fsync of the directory. On failure the temporary file is removed.
pub fn write_atomic(path: &Path, parts: &[&[u8]]) -> CacheResult<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PromptCacheError::io(path, e)
    })
}

/// An entry's bytes, in parts: `tokens` (one per cached position) and the cache's
/// rows, under `key`, with `meta` beside.
fn encode_entry(
    key: &CacheKey,
    tokens: &[u32],
    snap: &KvSnapshot,
    meta: serde_json::Value,
) -> Vec<Vec<u8>> {
    let paged = snap.layers.iter().all(|l| l.rows == snap.len);
    // f16 where that loses nothing: a cache stored in f16 reads back exactly.
    let f16 = snap.layers.iter().all(|l| {
        l.keys
            .iter()
            .chain(&l.values)
            .all(|&x| half::f16::from_f32(x).to_f32() == x)
    });
    let chunks = encode(snap, f16, paged);
    let header = Header {
        version: VERSION,
        key: key.clone(),
        len: snap.len,
        layers: snap.layers.iter().map(|l| [l.rows, l.width]).collect(),
        element: if f16 { "f16" } else { "f32" }.into(),
        page: if paged { KV_PAGE } else { 0 },
        tokens: tokens.to_vec(),
        chunks: chunks.iter().map(|c| hex(&Sha256::digest(c))).collect(),
        meta,
    };
    // Plain data (numbers and strings) always serializes.
    let json = serde_json::to_vec(&header).unwrap_or_default();
    let mut head = MAGIC.to_vec();
    head.extend_from_slice(&(json.len() as u64).to_le_bytes());
    let sum = Sha256::digest(&json).to_vec();
    let mut parts = vec![head, json, sum];
    parts.extend(chunks);
    parts
}

/// Writes the parts of an entry atomically; returns its size.
fn write_entry(path: &Path, parts: &[Vec<u8>]) -> CacheResult<u64> {
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    write_atomic(path, &refs)?;
    Ok(parts.iter().map(|p| p.len() as u64).sum())
}

/// Reads and checks an entry's header; returns it and where the payload starts.
fn read_header(path: &Path, file: &mut File) -> CacheResult<(Header, u64)> {
    let mut head = [0u8; 16];
    file.read_exact(&mut head)
        .map_err(|_| PromptCacheError::corrupt(path, "truncated before its header"))?;
    if &head[..8] != MAGIC {
        return Err(PromptCacheError::corrupt(path, "not a prompt cache entry"));
    }
    let n = u64::from_le_bytes([
        head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
    ]) as usize;
    if n > MAX_HEADER {
        return Err(PromptCacheError::corrupt(
            path,
            "a header length out of range",
        ));
    }
    let mut json = vec![0u8; n + 32];
    file.read_exact(&mut json)
        .map_err(|_| PromptCacheError::corrupt(path, "truncated header"))?;
    let (json, sum) = json.split_at(n);
    if Sha256::digest(json).as_slice() != sum {
        return Err(PromptCacheError::corrupt(path, "header checksum mismatch"));
    }
    let h: Header = serde_json::from_slice(json)
        .map_err(|e| PromptCacheError::corrupt(path, format!("header: {e}")))?;
    let chunks_ok = if h.page == 0 {
        h.chunks.len() == 1
    } else {
        h.page == KV_PAGE
            && h.chunks.len() == h.len.div_ceil(h.page)
            && h.layers.iter().all(|&[r, _]| r == h.len)
    };
    // Bounds that keep every size below computed without overflow.
    let sane = h.len <= 1 << 24
        && h.layers.len() <= 1 << 12
        && h.layers.iter().all(|&[r, w]| r <= 1 << 24 && w <= 1 << 20);
    if !sane
        || h.version != VERSION
        || h.tokens.len() != h.len
        || !chunks_ok
        || !(h.element == "f16" || h.element == "f32")
    {
        return Err(PromptCacheError::corrupt(path, "an inconsistent header"));
    }
    let payload: u64 = (0..h.chunks.len()).map(|c| h.chunk_bytes(c) as u64).sum();
    let start = 16 + n as u64 + 32;
    let size = file
        .metadata()
        .map_err(|e| PromptCacheError::io(path, e))?
        .len();
    if size != start + payload {
        return Err(PromptCacheError::corrupt(
            path,
            format!("{size} bytes where its header promises {}", start + payload),
        ));
    }
    Ok((h, start))
}

/// Reads the first `chunks` chunks of an entry (checking each), as a snapshot of
/// their positions.
fn read_chunks(
    path: &Path,
    file: &mut File,
    h: &Header,
    start: u64,
    chunks: usize,
) -> CacheResult<KvSnapshot> {
    file.seek(SeekFrom::Start(start))
        .map_err(|e| PromptCacheError::io(path, e))?;
    let len = if h.page == 0 {
        h.len
    } else {
        (chunks * h.page).min(h.len)
    };
    let mut layers: Vec<LayerSnapshot> = h
        .layers
        .iter()
        .map(|&[rows, width]| LayerSnapshot {
            rows: if h.page == 0 { rows } else { len },
            width,
            keys: Vec::with_capacity(if h.page == 0 { rows } else { len } * width),
            values: Vec::with_capacity(if h.page == 0 { rows } else { len } * width),
        })
        .collect();
    let f16 = h.element == "f16";
    let decode = |bytes: &[u8], out: &mut Vec<f32>| {
        if f16 {
            out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            );
        } else {
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
    };
    let size = h.element_size();
    for c in 0..chunks.min(h.chunks.len()) {
        let mut buf = vec![0u8; h.chunk_bytes(c)];
        file.read_exact(&mut buf)
            .map_err(|_| PromptCacheError::corrupt(path, "truncated payload"))?;
        if hex(&Sha256::digest(&buf)) != h.chunks[c] {
            return Err(PromptCacheError::corrupt(
                path,
                format!("checksum mismatch in chunk {c}"),
            ));
        }
        let mut at = 0;
        for (l, &[rows, width]) in layers.iter_mut().zip(&h.layers) {
            let rows = if h.page == 0 {
                rows
            } else {
                h.chunk_rows(c).len()
            };
            let n = rows * width * size;
            decode(&buf[at..at + n], &mut l.keys);
            decode(&buf[at + n..at + 2 * n], &mut l.values);
            at += 2 * n;
        }
    }
    Ok(KvSnapshot { len, layers })
}

/// Saves a session's state (a chat's tokens and KV cache) to `path` under `key`,
/// atomically, with `meta` (the conversation) beside.
pub fn save_session(
    path: &Path,
    key: &CacheKey,
    state: &SessionState,
    meta: serde_json::Value,
) -> CacheResult<()> {
    let parts = encode_entry(key, &state.tokens, &state.cache, meta);
    write_entry(path, &parts).map(|_| ())
}

/// Reads a state saved by [`save_session`], checking every checksum and that it was
/// made under `key`.
pub fn load_session(path: &Path, key: &CacheKey) -> CacheResult<(SessionState, serde_json::Value)> {
    let mut file = File::open(path).map_err(|e| PromptCacheError::io(path, e))?;
    let (h, start) = read_header(path, &mut file)?;
    if &h.key != key {
        return Err(PromptCacheError::Foreign {
            path: path.display().to_string(),
            what: key.difference(&h.key),
        });
    }
    let cache = read_chunks(path, &mut file, &h, start, h.chunks.len())?;
    Ok((
        SessionState {
            tokens: h.tokens,
            cache,
        },
        h.meta,
    ))
}

/// Hits, misses and bytes of the prompt cache's tiers, counted since the start.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Requests that started from a RAM prefix entry, and those that did not.
    pub ram_hits: AtomicU64,
    pub ram_misses: AtomicU64,
    /// Of the RAM misses (with a disk tier): those that loaded an entry from disk,
    /// and those that found none.
    pub disk_hits: AtomicU64,
    pub disk_misses: AtomicU64,
    /// Bytes of host KV pages the RAM prefix cache holds, and of entries on disk.
    pub ram_bytes: AtomicU64,
    pub disk_bytes: AtomicU64,
    /// Bytes written to and read from disk.
    pub disk_written: AtomicU64,
    pub disk_read: AtomicU64,
    /// Entries skipped as truncated, corrupted or foreign.
    pub disk_skipped: AtomicU64,
    /// Whether the disk tier is on.
    pub disk_enabled: AtomicBool,
}

/// Where and how much: a server's `--cache-dir DIR --cache-disk-budget BYTES`.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub dir: PathBuf,
    /// Bytes of entries the directory may hold.
    pub budget: u64,
    /// The model's file (or directory), hashed into the key.
    pub model: PathBuf,
}

/// One entry on disk, as the index knows it.
#[derive(Debug, Clone)]
struct DiskEntry {
    path: PathBuf,
    tokens: Vec<u32>,
    bytes: u64,
    last_used: SystemTime,
}

struct Index {
    entries: Vec<DiskEntry>,
    /// Cleared when the directory stops taking writes (a full disk).
    enabled: bool,
}

struct Tier {
    dir: PathBuf,
    budget: u64,
    key: CacheKey,
    prefix: String,
    index: Mutex<Index>,
    stats: Arc<CacheStats>,
}

/// The disk tier of a scheduler's prefix cache. Writes happen on a thread of their
/// own, so a step never waits for the disk; dropping it finishes the writes queued.
pub struct DiskCache {
    tier: Arc<Tier>,
    jobs: Option<SyncSender<Job>>,
    writer: Option<JoinHandle<()>>,
}

/// What the writer thread does next.
enum Job {
    Write(Vec<u32>, KvCache),
    /// Answer once everything queued before is written.
    Flush(Sender<()>),
}

/// Prints a warning line of the prompt cache.
fn warn(message: impl std::fmt::Display) {
    eprintln!("warning: prompt cache: {message}");
}

impl DiskCache {
    /// Opens the tier in `opts.dir` for `engine`'s values (the model's digest is
    /// memoized in the directory); `None`, after a warning, when it cannot be used.
    pub fn for_engine(
        engine: &crate::Engine,
        opts: &DiskOptions,
        stats: Arc<CacheStats>,
    ) -> Option<DiskCache> {
        // Entries hold rows as the snapshot gives them (f16 or f32); block caches
        // (q8_0, q4_0) would be quantized again on the way back, which is not always
        // the same bits: their values are never restored from disk.
        if engine.cache_type().is_blocks() {
            warn(format!(
                "a {} KV cache is not written to disk; serving from RAM only",
                engine.cache_type().name()
            ));
            return None;
        }
        // The memo is only written if the directory takes files; `open` says if not.
        let _ = fs::create_dir_all(&opts.dir);
        match CacheKey::for_engine(engine, &opts.model, Some(&opts.dir)) {
            Ok(key) => DiskCache::open(opts, key, stats),
            Err(e) => {
                warn(format!("hashing the model: {e}; serving from RAM only"));
                None
            }
        }
    }

    /// Opens the tier in `opts.dir` for values made under `key`: reads every entry's
    /// header (skipping with a warning each one that is not whole or not ours).
    /// `None`, with a warning, when the directory cannot be written.
    pub fn open(opts: &DiskOptions, key: CacheKey, stats: Arc<CacheStats>) -> Option<DiskCache> {
        if let Err(e) = probe(&opts.dir) {
            warn(format!(
                "{} cannot be written ({e}); serving from RAM only",
                opts.dir.display()
            ));
            return None;
        }
        let prefix = key.digest();
        let mut entries = Vec::new();
        let listing = match fs::read_dir(&opts.dir) {
            Ok(l) => l,
            Err(e) => {
                warn(format!(
                    "{} cannot be read ({e}); serving from RAM only",
                    opts.dir.display()
                ));
                return None;
            }
        };
        let all: Vec<PathBuf> = listing.filter_map(|e| e.ok().map(|e| e.path())).collect();
        // Temporary files of writes that a crash interrupted (an hour old: no write
        // takes that long).
        for tmp in all
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "tmp"))
        {
            let old = fs::metadata(tmp)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
            if old {
                let _ = fs::remove_file(tmp);
            }
        }
        let mut paths: Vec<PathBuf> = all
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "kv"))
            .collect();
        paths.sort();
        for path in paths {
            let read = File::open(&path)
                .map_err(|e| PromptCacheError::io(&path, e))
                .and_then(|mut f| read_header(&path, &mut f));
            match read {
                Ok((h, _)) if h.key != key => {
                    warn(format!(
                        "skipping {}: made by {}",
                        path.display(),
                        key.difference(&h.key)
                    ));
                    stats.disk_skipped.fetch_add(1, Ordering::Relaxed);
                }
                Ok((h, _)) if h.page == 0 => {
                    warn(format!("skipping {}: not a paged entry", path.display()));
                    stats.disk_skipped.fetch_add(1, Ordering::Relaxed);
                }
                Ok((h, _)) => {
                    let meta = fs::metadata(&path).ok();
                    entries.push(DiskEntry {
                        bytes: meta.as_ref().map_or(0, |m| m.len()),
                        last_used: meta.and_then(|m| m.modified().ok()).unwrap_or(UNIX_EPOCH),
                        tokens: h.tokens,
                        path,
                    });
                }
                Err(e) => {
                    warn(format!("skipping {e}"));
                    stats.disk_skipped.fetch_add(1, Ordering::Relaxed);
                    // Ours by its name and not whole: never of use, so it goes.
                    let ours = path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&prefix));
                    if ours {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        stats.disk_enabled.store(true, Ordering::Relaxed);
        let tier = Arc::new(Tier {
            dir: opts.dir.clone(),
            budget: opts.budget,
            key,
            prefix,
            index: Mutex::new(Index {
                entries,
                enabled: true,
            }),
            stats,
        });
        {
            let mut index = tier.lock();
            tier.evict(&mut index, 0, None);
            tier.count_bytes(&index);
        }
        // A short queue: a cache waiting to be written holds its pages, which the RAM
        // budget no longer counts, so while the disk is behind, spills are dropped.
        let (jobs, inbox) = mpsc::sync_channel::<Job>(QUEUE);
        let writer_tier = tier.clone();
        let writer = std::thread::Builder::new()
            .name("llama-prompt-cache".into())
            .spawn(move || {
                for job in inbox {
                    match job {
                        Job::Write(tokens, cache) => writer_tier.write(&tokens, &cache),
                        Job::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(|e| warn(format!("starting its writer: {e}; serving from RAM only")))
            .ok()?;
        Some(DiskCache {
            tier,
            jobs: Some(jobs),
            writer: Some(writer),
        })
    }

    /// Queues what a finished sequence cached (`tokens`, one per position of `cache`)
    /// for writing. Only caches whose layers all keep every position (host layers)
    /// are written: those can be read back a page at a time.
    pub fn spill(&self, tokens: Vec<u32>, cache: KvCache) {
        if !cache.shares_pages() || cache.is_empty() || !self.tier.lock().enabled {
            return;
        }
        if let Some(jobs) = &self.jobs {
            let _ = jobs.try_send(Job::Write(tokens, cache));
        }
    }

    /// Waits until every write queued so far is done (or given up).
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if let Some(jobs) = &self.jobs {
            if jobs.send(Job::Flush(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    /// Whether the tier still reads and writes (a full disk turns it off).
    pub fn enabled(&self) -> bool {
        self.tier.lock().enabled
    }

    /// Entries in the index.
    pub fn len(&self) -> usize {
        self.tier.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry sharing the most tokens with `prompt`: its index and that count.
    fn best(&self, prompt: &[u32]) -> Option<(PathBuf, Vec<u32>, usize)> {
        let index = self.tier.lock();
        if !index.enabled {
            return None;
        }
        index
            .entries
            .iter()
            .map(|e| (e, common(&e.tokens, prompt)))
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > 0)
            .map(|(e, n)| (e.path.clone(), e.tokens.clone(), n))
    }

    /// Loads the pages of the entry sharing the most tokens with `prompt` that hold
    /// its first `at_most` positions, if that shares more than `more_than`; returns
    /// their tokens and a cache of `program` holding them. An entry that turns out
    /// corrupted is skipped (with a warning) and removed.
    pub fn load(
        &self,
        prompt: &[u32],
        more_than: usize,
        at_most: usize,
        program: &Program,
        cache_type: KvType,
    ) -> Option<(Vec<u32>, KvCache)> {
        let (path, tokens, shared) = self.best(prompt)?;
        let shared = shared.min(at_most);
        if shared <= more_than {
            return None;
        }
        let result = (|| -> CacheResult<(Vec<u32>, KvCache)> {
            let mut file = File::open(&path).map_err(|e| PromptCacheError::io(&path, e))?;
            let (h, start) = read_header(&path, &mut file)?;
            if h.key != self.tier.key || h.tokens != tokens {
                return Err(PromptCacheError::corrupt(
                    &path,
                    "changed since it was read",
                ));
            }
            let snap = read_chunks(&path, &mut file, &h, start, shared.div_ceil(KV_PAGE))?;
            let mut cache = program.new_cache_of(snap.len, cache_type).map_err(|e| {
                PromptCacheError::corrupt(&path, format!("does not fit the model: {e}"))
            })?;
            cache.restore(&snap).map_err(|e| {
                PromptCacheError::corrupt(&path, format!("does not fit the model: {e}"))
            })?;
            let bytes: usize = snap.layers.iter().map(|l| 2 * l.keys.len()).sum();
            let size = if h.element == "f16" { 2 } else { 4 };
            self.tier
                .stats
                .disk_read
                .fetch_add((bytes * size) as u64, Ordering::Relaxed);
            Ok((h.tokens[..snap.len].to_vec(), cache))
        })();
        match result {
            Ok(x) => {
                self.tier.touch(&path);
                Some(x)
            }
            Err(e) => {
                if !matches!(&e, PromptCacheError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
                {
                    warn(format!("skipping {e}"));
                    self.tier.stats.disk_skipped.fetch_add(1, Ordering::Relaxed);
                }
                self.tier.forget(&path);
                None
            }
        }
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written what is queued.
        self.jobs = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Whether `dir` takes files: creates it, then writes, syncs and removes a probe.
fn probe(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".probe.{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&probe)?;
        f.write_all(b"probe")?;
        f.sync_all()
    })();
    let _ = fs::remove_file(&probe);
    result
}

impl Tier {
    fn lock(&self) -> MutexGuard<'_, Index> {
        // A writer that panicked left the index as it was between two changes.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count_bytes(&self, index: &Index) {
        let bytes = index.entries.iter().map(|e| e.bytes).sum();
        self.stats.disk_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Removes least recently used entries (never `keep`) until `room` more bytes fit
    /// the budget; returns whether they do.
    fn evict(&self, index: &mut Index, room: u64, keep: Option<&Path>) -> bool {
        loop {
            let total: u64 = index.entries.iter().map(|e| e.bytes).sum();
            if total + room <= self.budget {
                return true;
            }
            let victim = index
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| Some(e.path.as_path()) != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i);
            let Some(v) = victim else { return false };
            let e = index.entries.remove(v);
            let _ = fs::remove_file(&e.path);
        }
    }

    fn forget(&self, path: &Path) {
        let mut index = self.lock();
        index.entries.retain(|e| e.path != path);
        let _ = fs::remove_file(path);
        self.count_bytes(&index);
    }

    /// Marks an entry used now (in the index and the file's modification time).
    fn touch(&self, path: &Path) {
        let now = SystemTime::now();
        let mut index = self.lock();
        if let Some(e) = index.entries.iter_mut().find(|e| e.path == path) {
            e.last_used = now;
        }
        if let Ok(f) = File::options().write(true).open(path) {
            let _ = f.set_modified(now);
        }
    }

    /// Writes one finished sequence's cache, unless an entry already holds its tokens;
    /// entries whose tokens it continues are removed once it is written.
    fn write(&self, tokens: &[u32], cache: &KvCache) {
        let len = cache.len().min(tokens.len());
        let tokens = &tokens[..len];
        {
            let index = self.lock();
            if !index.enabled || index.entries.iter().any(|e| e.tokens.starts_with(tokens)) {
                return;
            }
        }
        let snap = match cache.snapshot() {
            Ok(s) if s.len == len => s,
            _ => return,
        };
        let parts = encode_entry(&self.key, tokens, &snap, serde_json::Value::Null);
        drop(snap);
        let size: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let name = {
            let mut h = Sha256::new();
            h.update(
                tokens
                    .iter()
                    .flat_map(|t| t.to_le_bytes())
                    .collect::<Vec<_>>(),
            );
            format!("{}-{}.kv", self.prefix, hex(&h.finalize()[..16]))
        };
        let path = self.dir.join(name);
        {
            let mut index = self.lock();
            if size > self.budget || !self.evict(&mut index, size, None) {
                return;
            }
        }
        match write_entry(&path, &parts) {
            Ok(bytes) => {
                self.stats.disk_written.fetch_add(bytes, Ordering::Relaxed);
                let mut index = self.lock();
                let mut i = 0;
                while i < index.entries.len() {
                    let e = &index.entries[i];
                    if e.path == path || tokens.starts_with(&e.tokens) {
                        let e = index.entries.remove(i);
                        if e.path != path {
                            let _ = fs::remove_file(&e.path);
                        }
                    } else {
                        i += 1;
                    }
                }
                index.entries.push(DiskEntry {
                    path: path.clone(),
                    tokens: tokens.to_vec(),
                    bytes,
                    last_used: SystemTime::now(),
                });
                self.evict(&mut index, 0, Some(&path));
                self.count_bytes(&index);
            }
            Err(PromptCacheError::Full { .. }) => {
                warn(format!(
                    "the disk of {} is full; serving from RAM only",
                    self.dir.display()
                ));
                self.lock().enabled = false;
                self.stats.disk_enabled.store(false, Ordering::Relaxed);
            }
            Err(e) => warn(format!("writing {e}")),
        }
    }
}
