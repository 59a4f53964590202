//! The KV cache: keys and values of every attention layer, written in place.

use burn::tensor::{DType, Device, Tensor, TensorData};
use std::sync::Arc;

use llama_kernels::{
    quantize_blocks, rotate_heads, BlockQ4_0, BlockQ8_0, KvRows, Page, Pages, KEY_BLOCK, KV_BLOCK,
};

use crate::capabilities::Capabilities;
use crate::error::{GraphError, Result};
use crate::graph::Graph;
use crate::ir::{KvKind, Op};
use crate::value::Value;

/// One attention layer's keys and values.
#[derive(Debug, Clone)]
struct LayerCache {
    /// Keys and values, each `[rows, kv_heads * head_dim]` of `dtype`; `None` only
    /// while a step writes them.
    kv: [Option<Tensor<2>>; 2],
    /// The device tensors' element type: f16 where the cache type asks for it and the
    /// device computes in f16, else f32.
    dtype: DType,
    /// On CPU devices, layers without a window keep keys and values in host memory
    /// instead (grown as positions arrive, `[positions, width]` row-major), so the host
    /// attention reads them in place rather than copying the whole cache every step.
    host: Option<HostKv>,
    width: usize,
    /// Values per head (rows of block caches are rotated head by head).
    head_dim: usize,
    /// With a sliding window, `rows` is a ring: position `p` lives in row `p % rows`.
    window: Option<usize>,
    rows: usize,
}

/// How a KV cache stores keys and values: in host memory, or in device tensors on GPU
/// devices that compute in f16 (others keep f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// Exactly as computed.
    #[default]
    F32,
    /// Rounded to f16 (11 significant bits): half the memory, and half the bytes that
    /// decode attention reads per step.
    F16,
    /// Blocks of 32 values as 8-bit integers with an f16 scale (GGML's Q8_0): 34 bytes
    /// per 32 values, 53% of f16. Host layers only.
    Q8_0,
    /// Blocks of 32 values as 4-bit integers with an f16 scale (GGML's Q4_0): 18 bytes
    /// per 32 values, 28% of f16. Host layers only.
    Q4_0,
}

impl KvType {
    /// The name the `--cache-type` flag and llama.cpp's `-ctk` give it.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// Whether keys and values are stored in quantized blocks (host layers only).
    pub fn is_blocks(self) -> bool {
        matches!(self, KvType::Q8_0 | KvType::Q4_0)
    }

    /// Bytes that `values` keys or values take stored this way (a whole number of
    /// blocks for the block types).
    pub fn bytes_for(self, values: usize) -> usize {
        match self {
            KvType::F32 => values * 4,
            KvType::F16 => values * 2,
            KvType::Q8_0 => values / KV_BLOCK * std::mem::size_of::<BlockQ8_0>(),
            KvType::Q4_0 => values / KV_BLOCK * std::mem::size_of::<BlockQ4_0>(),
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One host layer's keys or values in pages of [`KEY_BLOCK`] positions. Pages are
/// shared: a cache cloned, or given another's prefix ([`KvCache::copy_prefix`]), holds
/// the same pages, and a page is copied only when a cache writes into one it shares
/// (copy on write). So sequences that share a prompt prefix share its memory, and a
/// session forks in the time it takes to count references.
#[derive(Debug, Clone)]
struct PagedRows<T> {
    pages: Vec<Page<T>>,
    /// Values that count (positions times width); a last page may hold stale rows
    /// after them, which the next write replaces.
    len: usize,
}

impl<T: Clone> PagedRows<T> {
    fn new() -> Self {
        PagedRows {
            pages: Vec::new(),
            len: 0,
        }
    }

    fn rows(&self, n: usize) -> Option<Pages<'_, T>> {
        (n <= self.len).then_some(Pages {
            pages: &self.pages,
            len: n,
        })
    }

    /// Replaces every value from `from` on with `new`, in pages of `page` values: the
    /// page holding `from` is copied first if another cache shares it.
    fn write(&mut self, from: usize, new: impl ExactSizeIterator<Item = T>, page: usize) {
        let from = from.min(self.len);
        self.pages.truncate(from.div_ceil(page));
        if !from.is_multiple_of(page) {
            if let Some(last) = self.pages.last_mut() {
                let keep = from % page;
                match Arc::get_mut(last) {
                    Some(p) => p.truncate(keep),
                    None => {
                        let mut p = Vec::with_capacity(page);
                        p.extend_from_slice(&last[..keep]);
                        *last = Arc::new(p);
                    }
                }
            }
        }
        self.len = from + new.len();
        let mut new = new.peekable();
        while new.peek().is_some() {
            let full = self.pages.last().is_none_or(|p| p.len() == page);
            if full {
                self.pages.push(Arc::new(Vec::with_capacity(page)));
            }
            if let Some(last) = self.pages.last_mut() {
                // Unique by now (a new page, or the one the truncation copied).
                let last = Arc::make_mut(last);
                let room = page - last.len();
                last.extend(new.by_ref().take(room));
            }
        }
    }

    /// The first `n` values of `src`, sharing its pages.
    fn share(&mut self, src: &PagedRows<T>, n: usize, page: usize) {
        self.pages = src.pages[..n.div_ceil(page)].to_vec();
        self.len = n;
    }

    /// Pages this layer holds that no other cache shares.
    fn own_pages(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| Arc::strong_count(p) == 1)
            .count()
    }
}

/// One host layer's keys and values: f32 or f16 values, or blocks of [`KV_BLOCK`]
/// values (each row, `width` values, a whole number of blocks; offsets and lengths
/// here count values, the pages count blocks).
#[derive(Debug, Clone)]
enum HostKv {
    F32([PagedRows<f32>; 2]),
    F16([PagedRows<half::f16>; 2]),
    Q8_0([PagedRows<BlockQ8_0>; 2]),
    Q4_0([PagedRows<BlockQ4_0>; 2]),
}

impl HostKv {
    fn new(ty: KvType) -> HostKv {
        match ty {
            KvType::F32 => HostKv::F32([PagedRows::new(), PagedRows::new()]),
            KvType::F16 => HostKv::F16([PagedRows::new(), PagedRows::new()]),
            KvType::Q8_0 => HostKv::Q8_0([PagedRows::new(), PagedRows::new()]),
            KvType::Q4_0 => HostKv::Q4_0([PagedRows::new(), PagedRows::new()]),
        }
    }

    /// Keys (0) or values (1), the first `n` values.
    fn rows(&self, kind: usize, n: usize) -> Option<KvRows<'_>> {
        Some(match self {
            HostKv::F32(x) => KvRows::PagedF32(x[kind].rows(n)?),
            HostKv::F16(x) => KvRows::PagedF16(x[kind].rows(n)?),
            HostKv::Q8_0(x) => KvRows::PagedQ8_0(x[kind].rows(n / KV_BLOCK)?),
            HostKv::Q4_0(x) => KvRows::PagedQ4_0(x[kind].rows(n / KV_BLOCK)?),
        })
    }

    /// Replaces everything from value `from` on with `new`; rows are `width` wide,
    /// of heads of `head_dim`. Block caches rotate ([`rotate_heads`]) and quantize
    /// each row here, once: a position's stored keys and values depend only on the
    /// values computed for it.
    fn write(&mut self, kind: usize, from: usize, new: &[f32], width: usize, head_dim: usize) {
        let page = KEY_BLOCK * width;
        let rotated = |new: &[f32]| {
            let mut x = new.to_vec();
            rotate_heads(&mut x, head_dim);
            x
        };
        match self {
            HostKv::F32(x) => x[kind].write(from, new.iter().copied(), page),
            HostKv::F16(x) => {
                x[kind].write(from, new.iter().map(|&v| half::f16::from_f32(v)), page)
            }
            HostKv::Q8_0(x) => x[kind].write(
                from / KV_BLOCK,
                quantize_blocks::<BlockQ8_0>(&rotated(new)),
                page / KV_BLOCK,
            ),
            HostKv::Q4_0(x) => x[kind].write(
                from / KV_BLOCK,
                quantize_blocks::<BlockQ4_0>(&rotated(new)),
                page / KV_BLOCK,
            ),
        }
    }

    /// Keys (0) or values (1), the first `n` values as f32: for blocks, dequantized
    /// and rotated back (the keys and values as computed, up to the quantization).
    fn values(&self, kind: usize, n: usize, head_dim: usize) -> Option<Vec<f32>> {
        let mut x = self.rows(kind, n)?.to_f32().into_owned();
        if matches!(self, HostKv::Q8_0(_) | HostKv::Q4_0(_)) {
            rotate_heads(&mut x, head_dim);
        }
        Some(x)
    }

    /// Keys and values hold the first `n` values of `src`'s, sharing its pages.
    fn share(&mut self, src: &HostKv, n: usize, width: usize) -> Result<()> {
        let page = KEY_BLOCK * width;
        let (bn, bpage) = (n / KV_BLOCK, page / KV_BLOCK);
        match (self, src) {
            (HostKv::F32(a), HostKv::F32(b)) => {
                a.iter_mut().zip(b).for_each(|(a, b)| a.share(b, n, page))
            }
            (HostKv::F16(a), HostKv::F16(b)) => {
                a.iter_mut().zip(b).for_each(|(a, b)| a.share(b, n, page))
            }
            (HostKv::Q8_0(a), HostKv::Q8_0(b)) => {
                a.iter_mut().zip(b).for_each(|(a, b)| a.share(b, bn, bpage))
            }
            (HostKv::Q4_0(a), HostKv::Q4_0(b)) => {
                a.iter_mut().zip(b).for_each(|(a, b)| a.share(b, bn, bpage))
            }
            _ => {
                return Err(GraphError::Input(
                    "cannot share the pages of a KV cache of another type".into(),
                ))
            }
        }
        Ok(())
    }

    /// Each page by its address, with its size in bytes.
    fn page_sizes(&self, out: &mut Vec<(usize, usize)>) {
        fn of<T>(x: &[PagedRows<T>; 2], out: &mut Vec<(usize, usize)>) {
            for p in x.iter().flat_map(|x| &x.pages) {
                let at = Arc::as_ptr(p) as usize;
                out.push((at, p.capacity() * std::mem::size_of::<T>()));
            }
        }
        match self {
            HostKv::F32(x) => of(x, out),
            HostKv::F16(x) => of(x, out),
            HostKv::Q8_0(x) => of(x, out),
            HostKv::Q4_0(x) => of(x, out),
        }
    }

    fn own_pages(&self) -> usize {
        match self {
            HostKv::F32(x) => x.iter().map(PagedRows::own_pages).sum(),
            HostKv::F16(x) => x.iter().map(PagedRows::own_pages).sum(),
            HostKv::Q8_0(x) => x.iter().map(PagedRows::own_pages).sum(),
            HostKv::Q4_0(x) => x.iter().map(PagedRows::own_pages).sum(),
        }
    }

    fn pages(&self) -> usize {
        match self {
            HostKv::F32(x) => x.iter().map(|x| x.pages.len()).sum(),
            HostKv::F16(x) => x.iter().map(|x| x.pages.len()).sum(),
            HostKv::Q8_0(x) => x.iter().map(|x| x.pages.len()).sum(),
            HostKv::Q4_0(x) => x.iter().map(|x| x.pages.len()).sum(),
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
    ty: KvType,
}

impl KvCache {
    /// A cache for every `KvAppend` node of `graph`, holding `capacity` positions.
    pub fn for_graph(graph: &Graph, capacity: usize, device: &Device) -> Result<Self> {
        Self::for_graph_of(graph, capacity, device, KvType::F32)
    }

    /// The same with keys and values stored as `ty`: host layers (layers without a
    /// window, on devices whose [`Capabilities`] keep the cache in host memory), and
    /// device layers on GPU devices (block kernels) that support f16.
    ///
    /// The block types ([`KvType::Q8_0`], [`KvType::Q4_0`]) are for host layers: a
    /// device without a host cache refuses them, and so does a model whose heads are
    /// not whole blocks of 32. Sliding-window layers (device tensors, a ring of the
    /// last `window` positions) keep f32 on CPU devices: their memory is bounded by the
    /// window, not the context.
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
        let caps = Capabilities::of(device);
        let host_kv = caps.host_kv;
        let head_dim = if ty.is_blocks() {
            check_blocks(graph, ty, host_kv, &specs)?
        } else {
            0
        };
        let dtype = if ty == KvType::F16 && caps.device_blocks && device.supports_dtype(DType::F16)
        {
            DType::F16
        } else {
            DType::F32
        };
        let layers = specs
            .into_iter()
            .map(|spec| {
                let (width, window) = spec.unwrap_or((0, None));
                let rows = window.map_or(capacity, |w| w.min(capacity));
                if window.is_none() && host_kv {
                    return LayerCache {
                        kv: [None, None],
                        host: Some(HostKv::new(ty)),
                        dtype: DType::F32,
                        width,
                        head_dim,
                        window,
                        rows,
                    };
                }
                let z = || Some(Tensor::<2>::zeros([rows, width], (device, dtype)));
                LayerCache {
                    kv: [z(), z()],
                    host: None,
                    dtype,
                    width,
                    head_dim,
                    window,
                    rows,
                }
            })
            .collect();
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            ty,
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

    /// How host layers store keys and values.
    pub fn cache_type(&self) -> KvType {
        self.ty
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pages of host layers (keys and values, every layer): all that this cache holds,
    /// and those of them no other cache shares.
    pub fn pages(&self) -> PageCount {
        let host = self.layers.iter().filter_map(|l| l.host.as_ref());
        PageCount {
            held: host.clone().map(HostKv::pages).sum(),
            own: host.map(HostKv::own_pages).sum(),
        }
    }

    /// The host pages this cache holds, each by its address (the same for a page
    /// shared with another cache) and its size in bytes.
    pub fn page_sizes(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for h in self.layers.iter().filter_map(|l| l.host.as_ref()) {
            h.page_sizes(&mut out);
        }
        out
    }

    /// Whether every layer keeps its rows in shared pages (host layers), so that a
    /// clone or [`KvCache::copy_prefix`] shares memory instead of copying it.
    pub fn shares_pages(&self) -> bool {
        self.layers.iter().all(|l| l.host.is_some())
    }

    /// Bytes of the device tensors (keys and values of layers not kept in host
    /// memory), for memory accounting.
    pub fn device_bytes(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.host.is_none())
            .map(|l| 2 * l.rows * l.width * l.dtype.size())
            .sum()
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
        if !self.can_rewind(self.len, len) {
            return Err(GraphError::Input(format!(
                "cannot rewind a sliding-window cache from {} to {len} positions (it keeps the last {})",
                self.len,
                self.layers
                    .iter()
                    .filter(|l| l.window.is_some())
                    .map(|l| l.rows)
                    .min()
                    .unwrap_or(0)
            )));
        }
        self.len = len;
        Ok(())
    }

    /// Whether a cache holding `from` positions could be rewound to `len`: a ring
    /// that has wrapped overwrote the rows of positions it no longer keeps, and a
    /// position's window must still be whole after the rewind.
    fn can_rewind(&self, from: usize, len: usize) -> bool {
        len >= from
            || len == 0
            || self.layers.iter().all(|l| match l.window {
                Some(w) => from <= l.rows || len + l.rows >= from + w - 1,
                None => true,
            })
    }

    /// The most positions (up to `max`) past the next one that a step may write and
    /// then take back to just after the next one: how long a speculative draft can be
    /// here (the room left, and what a sliding-window ring can rewind).
    pub fn draft_room(&self, max: usize) -> usize {
        let room = self.capacity.saturating_sub(self.len + 1).min(max);
        (0..=room)
            .rev()
            .find(|&k| self.can_rewind(self.len + 1 + k, self.len + 1))
            .unwrap_or(0)
    }

    /// The cached rows on the host: positions `0..len` of full layers, the whole ring
    /// of sliding-window layers. Block layers give their keys and values dequantized
    /// and rotated back, so a snapshot is the same kind of data for every cache type.
    pub fn snapshot(&self) -> Result<KvSnapshot> {
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if let Some(host) = &l.host {
                    let n = self.len * l.width;
                    let read = |kind| {
                        host.values(kind, n, l.head_dim).ok_or_else(|| {
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
                    let rows_f32 = t.clone().narrow(0, 0, rows).cast(DType::F32);
                    let data = Value::F2(rows_f32).to_f32_vec()?;
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

    /// Writes a snapshot back; it must have this cache's layout. A block cache
    /// quantizes the snapshot's values again: the same blocks, but for a rare value
    /// that the rotations' rounding tips over a rounding edge.
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
                host.write(0, 0, &s.keys, l.width, l.head_dim);
                host.write(1, 0, &s.values, l.width, l.head_dim);
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
                )
                .cast(l.dtype);
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
            host.write(kind as usize, past * l.width, &new, l.width, l.head_dim);
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
            if past + seq > rows {
                *slot = Some(cache);
                return Err(GraphError::Input(format!(
                    "KV cache layer {layer} holds {rows} positions, not {}",
                    past + seq
                )));
            }
            // Stored (and read back by attention, this step's rows included) in the
            // cache's element type, as host layers are. The cache tensor is uniquely
            // owned here, so it is written in place.
            let cache = crate::gpu::write_rows(cache, new, past);
            let all = cache.clone().narrow(0, 0, past + seq);
            *slot = Some(cache);
            return Ok(Value::F2(all));
        };
        // Sliding window: the last min(past, w - 1) positions from the ring, then the new
        // rows; then the newest min(seq, rows) rows go into the ring.
        let new = new.cast(l.dtype);
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
    /// with another starts from instead of running the prefix again. Host layers
    /// share `src`'s pages (nothing is copied until one of the two writes into a
    /// shared page); device layers are copied. A layer with a sliding window can give
    /// only positions it still holds.
    pub fn copy_prefix(&mut self, src: &KvCache, n: usize) -> Result<()> {
        let same_layout = self.layers.len() == src.layers.len()
            && self.layers.iter().zip(&src.layers).all(|(a, b)| {
                a.width == b.width
                    && a.window == b.window
                    && a.host.is_some() == b.host.is_some()
                    && a.dtype == b.dtype
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
            if let (Some(host), Some(from)) = (&mut l.host, &s.host) {
                if from.rows(0, values).is_none() || from.rows(1, values).is_none() {
                    return Err(GraphError::Input("a KV cache layer is short".into()));
                }
                host.share(from, values, l.width)?;
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

    /// The same rows as f32 values: for a block cache, dequantized and rotated back
    /// (what the layer's keys or values were, up to the quantization).
    pub fn host_values(&self, rows: &CachedRows) -> Result<Vec<f32>> {
        self.layers
            .get(rows.layer)
            .and_then(|l| {
                l.host
                    .as_ref()?
                    .values(rows.kind as usize, rows.rows * rows.width, l.head_dim)
            })
            .ok_or_else(|| {
                GraphError::Input(format!(
                    "KV cache layer {} holds no host rows {}",
                    rows.layer, rows.rows
                ))
            })
    }

    /// The first `rows.rows` keys or values of a host layer, row-major (rows of a
    /// block cache as stored: rotated, see [`llama_kernels::rotate_heads`]).
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

/// Pages of a [`KvCache`]'s host layers ([`KvCache::pages`]), each [`KEY_BLOCK`]
/// positions of one layer's keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCount {
    pub held: usize,
    pub own: usize,
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

/// Refuses a block cache type where the graph's layers cannot hold it: a device
/// without host layers, or rows or heads that are not whole blocks.
fn check_blocks(
    graph: &Graph,
    ty: KvType,
    host_kv: bool,
    specs: &[Option<(usize, Option<usize>)>],
) -> Result<usize> {
    let refuse = |message: String| GraphError::CacheType {
        ty: ty.name(),
        message,
    };
    if !host_kv {
        return Err(refuse(
            "blocks are read by the host attention only; this device keeps its KV cache as tensors (use f16 or f32)".into(),
        ));
    }
    let mut dims = graph.nodes().iter().filter_map(|n| match n.op {
        Op::Attention { head_dim, .. } => Some(head_dim),
        _ => None,
    });
    let first = dims.next().unwrap_or(KV_BLOCK);
    for head_dim in std::iter::once(first).chain(dims) {
        if !head_dim.is_multiple_of(KV_BLOCK) {
            return Err(refuse(format!(
                "heads of {head_dim} values are not whole blocks of {KV_BLOCK}"
            )));
        }
        if head_dim != first {
            return Err(refuse(format!(
                "layers with heads of {first} and {head_dim} values"
            )));
        }
    }
    if let Some((width, _)) = specs
        .iter()
        .flatten()
        .find(|(width, _)| !width.is_multiple_of(KV_BLOCK))
    {
        return Err(refuse(format!(
            "rows of {width} keys are not whole blocks of {KV_BLOCK}"
        )));
    }
    Ok(first)
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
