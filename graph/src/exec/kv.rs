//! The KV cache: keys and values of every attention layer, written in place.

use burn::tensor::{Device, Tensor, TensorData};
use llama_kernels::KvRows;

use crate::capabilities::Capabilities;
use crate::error::{GraphError, Result};
use crate::graph::Graph;
use crate::ir::{KvKind, Op};
use crate::value::Value;

/// One attention layer's keys and values.
#[derive(Debug, Clone)]
struct LayerCache {
    /// Keys and values, each `[rows, kv_heads * head_dim]`; `None` only while a step
    /// writes them.
    kv: [Option<Tensor<2>>; 2],
    /// On CPU devices, layers without a window keep keys and values in host memory
    /// instead (grown as positions arrive, `[positions, width]` row-major), so the host
    /// attention reads them in place rather than copying the whole cache every step.
    host: Option<HostKv>,
    width: usize,
    /// With a sliding window, `rows` is a ring: position `p` lives in row `p % rows`.
    window: Option<usize>,
    rows: usize,
}

/// How a KV cache in host memory stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// Exactly as computed.
    #[default]
    F32,
    /// Rounded to f16 (11 significant bits): half the memory, and half the bytes that
    /// decode attention reads per step.
    F16,
}

/// One host layer's keys and values.
#[derive(Debug, Clone)]
enum HostKv {
    F32([Vec<f32>; 2]),
    F16([Vec<half::f16>; 2]),
}

impl HostKv {
    fn new(ty: KvType) -> HostKv {
        match ty {
            KvType::F32 => HostKv::F32([Vec::new(), Vec::new()]),
            KvType::F16 => HostKv::F16([Vec::new(), Vec::new()]),
        }
    }

    /// Keys (0) or values (1), rows `0..n / width`.
    fn rows(&self, kind: usize, n: usize) -> Option<KvRows<'_>> {
        Some(match self {
            HostKv::F32(x) => KvRows::F32(x[kind].get(..n)?),
            HostKv::F16(x) => KvRows::F16(x[kind].get(..n)?),
        })
    }

    /// Replaces everything from value `from` on with `new`, reserving `total` values
    /// the first time so that growing never copies (nor holds twice the size); pages
    /// are only touched as positions are written.
    fn write(&mut self, kind: usize, from: usize, new: &[f32], total: usize) {
        fn put<T>(data: &mut Vec<T>, from: usize, total: usize, new: impl Iterator<Item = T>) {
            if data.capacity() == 0 {
                data.reserve_exact(total);
            }
            data.truncate(from);
            data.extend(new);
        }
        match self {
            HostKv::F32(x) => put(&mut x[kind], from, total, new.iter().copied()),
            HostKv::F16(x) => put(
                &mut x[kind],
                from,
                total,
                new.iter().map(|&v| half::f16::from_f32(v)),
            ),
        }
    }

    /// Keys (0) or values (1) from f32, as a restored state.
    fn set(&mut self, kind: usize, data: &[f32]) {
        match self {
            HostKv::F32(x) => x[kind] = data.to_vec(),
            HostKv::F16(x) => x[kind] = data.iter().map(|&v| half::f16::from_f32(v)).collect(),
        }
    }
}

/// Preallocated keys and values of every attention layer, written in place.
///
/// Rows hold the cached positions; a step writes its rows after the cached ones and
/// only then advances `len`, so a step that fails changes nothing observable. Layers
/// with a sliding window keep only the last `window` positions (a ring buffer), so
/// their memory is bounded by the window, not the context.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for every `KvAppend` node of `graph`, holding `capacity` positions.
    pub fn for_graph(graph: &Graph, capacity: usize, device: &Device) -> Result<Self> {
        Self::for_graph_of(graph, capacity, device, KvType::F32)
    }

    /// The same with host layers stored as `ty`: layers without a window, on devices
    /// whose [`Capabilities`] keep the cache in host memory.
    pub fn for_graph_of(
        graph: &Graph,
        capacity: usize,
        device: &Device,
        ty: KvType,
    ) -> Result<Self> {
        let mut specs: Vec<Option<(usize, Option<usize>)>> = Vec::new();
        for node in graph.nodes() {
            if let Op::KvAppend { layer, window, .. } = node.op {
                let width = node.shape.fixed_dim(1).ok_or_else(|| GraphError::Invalid {
                    node: node.name.clone(),
                    message: "kv width is not fixed".into(),
                })?;
                if specs.len() <= layer {
                    specs.resize(layer + 1, None);
                }
                specs[layer] = Some((width, window));
            }
        }
        let host_kv = Capabilities::of(device).host_kv;
        let layers = specs
            .into_iter()
            .map(|spec| {
                let (width, window) = spec.unwrap_or((0, None));
                let rows = window.map_or(capacity, |w| w.min(capacity));
                if window.is_none() && host_kv {
                    return LayerCache {
                        kv: [None, None],
                        host: Some(HostKv::new(ty)),
                        width,
                        window,
                        rows,
                    };
                }
                let z = || Some(Tensor::<2>::zeros([rows, width], device));
                LayerCache {
                    kv: [z(), z()],
                    host: None,
                    width,
                    window,
                    rows,
                }
            })
            .collect();
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Marks positions `..len` as cached, once a step has written them all.
    pub(super) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// Positions currently cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows allocated per layer (keys or values), for memory accounting.
    pub fn rows_per_layer(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.rows).collect()
    }

    /// Forgets every position from `len` on. A sliding-window layer can only go back
    /// as far as the positions it still holds allow.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        for l in &self.layers {
            if let Some(w) = l.window {
                let wrapped = self.len > l.rows;
                if wrapped && len > 0 && len + l.rows < self.len + w - 1 {
                    return Err(GraphError::Input(format!(
                        "cannot rewind a sliding-window cache from {} to {len} positions (it keeps the last {})",
                        self.len, l.rows
                    )));
                }
            }
        }
        self.len = len;
        Ok(())
    }

    /// The cached rows on the host: positions `0..len` of full layers, the whole ring
    /// of sliding-window layers.
    pub fn snapshot(&self) -> Result<KvSnapshot> {
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if let Some(host) = &l.host {
                    let n = self.len * l.width;
                    let read = |kind| {
                        host.rows(kind, n)
                            .map(|r| r.to_f32().into_owned())
                            .ok_or_else(|| {
                                GraphError::Input(format!("KV cache layer {i} is short"))
                            })
                    };
                    return Ok(LayerSnapshot {
                        rows: self.len,
                        width: l.width,
                        keys: read(0)?,
                        values: read(1)?,
                    });
                }
                let read = |t: &Option<Tensor<2>>| -> Result<(usize, usize, Vec<f32>)> {
                    let t = t.as_ref().ok_or_else(|| {
                        GraphError::Input(format!(
                            "KV cache layer {i} was lost by an earlier failure"
                        ))
                    })?;
                    let width = t.dims()[1];
                    let rows = if l.window.is_some() { l.rows } else { self.len };
                    let data = Value::F2(t.clone().narrow(0, 0, rows)).to_f32_vec()?;
                    Ok((rows, width, data))
                };
                let (rows, width, keys) = read(&l.kv[0])?;
                let (_, _, values) = read(&l.kv[1])?;
                Ok(LayerSnapshot {
                    rows,
                    width,
                    keys,
                    values,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvSnapshot {
            len: self.len,
            layers,
        })
    }

    /// Writes a snapshot back; it must have this cache's layout.
    pub fn restore(&mut self, snap: &KvSnapshot) -> Result<()> {
        if snap.layers.len() != self.layers.len() || snap.len > self.capacity {
            return Err(GraphError::Input(format!(
                "a state of {} layers and {} positions does not fit this cache ({} layers, {} positions)",
                snap.layers.len(),
                snap.len,
                self.layers.len(),
                self.capacity
            )));
        }
        for (i, (l, s)) in self.layers.iter().zip(&snap.layers).enumerate() {
            let width = l.width;
            let rows_ok = if l.window.is_some() {
                s.rows == l.rows
            } else {
                s.rows == snap.len
            };
            if s.width != width
                || !rows_ok
                || s.keys.len() != s.rows * s.width
                || s.values.len() != s.rows * s.width
            {
                return Err(GraphError::Input(format!(
                    "layer {i} of the state does not match the cache"
                )));
            }
        }
        for (l, s) in self.layers.iter_mut().zip(&snap.layers) {
            if let Some(host) = &mut l.host {
                host.set(0, &s.keys);
                host.set(1, &s.values);
                continue;
            }
            for (slot, data) in l.kv.iter_mut().zip([&s.keys, &s.values]) {
                let cache = slot.take().ok_or_else(|| {
                    GraphError::Input("a KV cache layer was lost by an earlier failure".into())
                })?;
                let device = cache.device();
                let rows = Tensor::<2>::from_data(
                    TensorData::new(data.clone(), [s.rows, s.width]),
                    &device,
                );
                *slot = Some(if s.rows == 0 {
                    cache
                } else {
                    cache.slice_assign([0..s.rows, 0..s.width], rows)
                });
            }
        }
        self.len = snap.len;
        Ok(())
    }

    /// Writes `new` (this step's rows) after position `past` of one layer's keys or
    /// values; returns the rows attention needs, oldest first: a tensor, or for a host
    /// layer a reference to its rows (with this step's own rows as computed when the
    /// layer stores them rounded).
    pub(super) fn append(
        &mut self,
        layer: usize,
        kind: KvKind,
        past: usize,
        new: Tensor<2>,
    ) -> Result<Value> {
        let seq = new.dims()[0];
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| GraphError::Input(format!("the KV cache has no layer {layer}")))?;
        if let Some(host) = &mut l.host {
            // Rows past `past` belong to a step that failed; this step replaces them.
            let new = Value::F2(new).into_f32_vec()?;
            host.write(kind as usize, past * l.width, &new, l.rows * l.width);
            // Attention reads every position as stored, a step's own ones included
            // (rounded, with an f16 cache): a position's keys and values are the same
            // whether this step computed them, an earlier chunk of the prompt did, or
            // they were copied from another sequence's cached prefix, so what a
            // sequence generates does not depend on how its prompt was split or shared.
            return Ok(Value::Cached(CachedRows {
                layer,
                kind,
                rows: past + seq,
                width: l.width,
            }));
        }
        let (rows, window) = (l.rows, l.window);
        let slot = &mut l.kv[kind as usize];
        let mut cache = slot.take().ok_or_else(|| {
            GraphError::Input(format!(
                "KV cache layer {layer} was lost by an earlier failure"
            ))
        })?;
        let width = cache.dims()[1];
        let Some(w) = window else {
            // The cache tensor is uniquely owned here, so burn writes it in place.
            let cache = cache.slice_assign([past..past + seq, 0..width], new);
            let all = cache.clone().narrow(0, 0, past + seq);
            *slot = Some(cache);
            return Ok(Value::F2(all));
        };
        // Sliding window: the last min(past, w - 1) positions from the ring, then the new
        // rows; then the newest min(seq, rows) rows go into the ring.
        let keep = past.min(w - 1);
        let mut parts = ring_ranges(past - keep, keep, rows)
            .into_iter()
            .map(|(start, n)| cache.clone().narrow(0, start, n))
            .collect::<Vec<_>>();
        parts.push(new.clone());
        let out = Tensor::cat(parts, 0);
        let m = seq.min(rows);
        let mut offset = seq - m;
        for (start, n) in ring_ranges(past + seq - m, m, rows) {
            cache = cache.slice_assign(
                [start..start + n, 0..width],
                new.clone().narrow(0, offset, n),
            );
            offset += n;
        }
        *slot = Some(cache);
        Ok(Value::F2(out))
    }

    /// Makes this cache hold the first `n` positions of `src` (a cache of the same
    /// graph), and nothing after them: what a sequence that shares a prompt prefix
    /// with another starts from instead of running the prefix again. A layer with a
    /// sliding window can give only positions it still holds.
    pub fn copy_prefix(&mut self, src: &KvCache, n: usize) -> Result<()> {
        let same_layout = self.layers.len() == src.layers.len()
            && self.layers.iter().zip(&src.layers).all(|(a, b)| {
                a.width == b.width && a.window == b.window && a.host.is_some() == b.host.is_some()
            });
        if !same_layout || n > src.len || n > self.capacity {
            return Err(GraphError::Input(format!(
                "cannot copy {n} positions of a cache of {} into one of {} (or the layouts differ)",
                src.len, self.capacity
            )));
        }
        // A sliding-window layer gives the first `n` positions while its ring has not
        // wrapped, or all of them (the ring as it is) when `n` is everything it saw.
        let whole = n == src.len;
        for (l, s) in self.layers.iter().zip(&src.layers) {
            let unwrapped = src.len <= s.rows && n <= l.rows;
            if l.window.is_some() && !unwrapped && !(whole && l.rows == s.rows) {
                return Err(GraphError::Input(format!(
                    "a sliding-window layer no longer holds the first {n} positions"
                )));
            }
        }
        for (l, s) in self.layers.iter_mut().zip(&src.layers) {
            let values = n * l.width;
            let total = l.rows * l.width;
            if let (Some(host), Some(from)) = (&mut l.host, &s.host) {
                for kind in 0..2 {
                    let rows = from
                        .rows(kind, values)
                        .ok_or_else(|| GraphError::Input("a KV cache layer is short".into()))?;
                    host.write(kind, 0, &rows.to_f32(), total);
                }
                continue;
            }
            if n == 0 {
                continue;
            }
            // Ring rows of a window layer (position p in row p % rows), or the first
            // `n` rows of a full one.
            let count = n.min(l.rows);
            for (slot, from) in l.kv.iter_mut().zip(&s.kv) {
                let lost =
                    || GraphError::Input("a KV cache layer was lost by an earlier failure".into());
                let from = from.as_ref().ok_or_else(lost)?;
                let cache = slot.take().ok_or_else(lost)?;
                let width = l.width;
                *slot = Some(
                    cache.slice_assign([0..count, 0..width], from.clone().narrow(0, 0, count)),
                );
            }
        }
        self.len = n;
        Ok(())
    }

    /// The first `rows.rows` keys or values of a host layer, row-major.
    pub fn host_rows(&self, rows: &CachedRows) -> Result<KvRows<'_>> {
        self.layers
            .get(rows.layer)
            .and_then(|l| l.host.as_ref())
            .and_then(|h| h.rows(rows.kind as usize, rows.rows * rows.width))
            .ok_or_else(|| {
                GraphError::Input(format!(
                    "KV cache layer {} holds no host rows {}",
                    rows.layer, rows.rows
                ))
            })
    }
}

/// The first `rows` keys or values of one layer of a [`KvCache`] kept in host memory
/// (what a `kv_append` node yields on devices with a host cache); read with
/// [`KvCache::host_rows`].
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRows {
    pub layer: usize,
    pub kind: KvKind,
    pub rows: usize,
    pub width: usize,
}

/// A KV cache copied to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct KvSnapshot {
    pub len: usize,
    pub layers: Vec<LayerSnapshot>,
}

/// One layer of a [`KvSnapshot`]: `rows` by `width` keys and values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSnapshot {
    pub rows: usize,
    pub width: usize,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

/// The row ranges of positions `first..first + n` in a ring of `rows` rows.
fn ring_ranges(first: usize, n: usize, rows: usize) -> Vec<(usize, usize)> {
    if n == 0 {
        return Vec::new();
    }
    let start = first % rows;
    if start + n <= rows {
        vec![(start, n)]
    } else {
        vec![(start, rows - start), (0, n - (rows - start))]
    }
}
