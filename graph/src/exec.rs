//! The executor: lowers each node to burn tensor ops on any burn device.
use std::collections::BTreeSet;

use burn::tensor::activation;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::cpu::KvRows;
use crate::error::{GraphError, Result};
use crate::graph::Graph;
use crate::ir::{KvKind, NodeId, Op, RopeScaling};
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
    /// Keys and values a step of several positions wrote to an f16 host cache, as
    /// computed, until its attention reads them (see [`KvCache::take_fresh`]).
    fresh: [Option<Vec<f32>>; 2],
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

    /// The same with host layers (CPU devices, no window) stored as `ty`.
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
        let layers = specs
            .into_iter()
            .map(|spec| {
                let (width, window) = spec.unwrap_or((0, None));
                let rows = window.map_or(capacity, |w| w.min(capacity));
                if window.is_none() && is_cpu(device) {
                    return LayerCache {
                        kv: [None, None],
                        host: Some(HostKv::new(ty)),
                        fresh: [None, None],
                        width,
                        window,
                        rows,
                    };
                }
                let z = || Some(Tensor::<2>::zeros([rows, width], device));
                LayerCache {
                    kv: [z(), z()],
                    host: None,
                    fresh: [None, None],
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
    /// values; returns the rows attention needs, oldest first.
    fn append(&mut self, layer: usize, kind: KvKind, past: usize, new: Tensor<2>) -> Result<Value> {
        let seq = new.dims()[0];
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| GraphError::Input(format!("the KV cache has no layer {layer}")))?;
        if let Some(host) = &mut l.host {
            // Rows past `past` belong to a step that failed; this step replaces them.
            let new = Value::F2(new).into_f32_vec()?;
            host.write(kind as usize, past * l.width, &new, l.rows * l.width);
            // A prompt's own keys and values stay exact for its attention; later steps
            // read them rounded.
            l.fresh[kind as usize] = (matches!(host, HostKv::F16(_)) && seq > 1).then_some(new);
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

    /// The rows a step of several positions just wrote to an f16 host layer, as they
    /// were computed (once: they are handed over). `None` for other caches and steps.
    pub fn take_fresh(&mut self, rows: &CachedRows) -> Option<Vec<f32>> {
        let l = self.layers.get_mut(rows.layer)?;
        let fresh = l.fresh[rows.kind as usize].take()?;
        (fresh.len() <= rows.rows * rows.width).then_some(fresh)
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
/// (what a `kv_append` node yields on CPU devices); read with [`KvCache::host_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Which node outputs a run should capture.
#[derive(Debug, Clone, Default)]
pub enum Taps {
    #[default]
    None,
    /// Every node's output, parameters excluded.
    All,
    Names(BTreeSet<String>),
}

impl Taps {
    fn wants(&self, name: &str, op: &Op) -> bool {
        match self {
            Taps::None => false,
            Taps::All => !matches!(op, Op::Param(_)),
            Taps::Names(set) => set.contains(name),
        }
    }
}

/// What one run of a graph produced.
#[derive(Debug)]
pub struct RunOutput {
    /// One value per graph output.
    pub outputs: Vec<Value>,
    /// Captured node outputs, in execution order.
    pub taps: Vec<(String, Value)>,
}

/// A graph ready to run on one device.
#[derive(Debug, Clone)]
pub struct Program {
    graph: Graph,
    device: Device,
    /// For each node, the last node that reads it (values are freed after it).
    last_use: Vec<usize>,
    /// Where the output stops mixing positions: from this node on, each row of the
    /// output depends only on the same row of this node's first input (the final norm
    /// and the output head), so a run that needs only the last position's output
    /// narrows that input to its last row.
    row_wise_from: Option<usize>,
    /// Time per op kind while profiling is on.
    profile: std::sync::Arc<std::sync::Mutex<Option<OpProfile>>>,
}

/// Wall time per op kind over the runs since profiling started. Meaningful on CPU
/// backends, where each op has finished when it returns.
#[derive(Debug, Clone, Default)]
pub struct OpProfile {
    /// Op kind (`matmul`, `attention`, ...; the output head apart) to (time, count).
    pub ops: std::collections::BTreeMap<&'static str, (std::time::Duration, u64)>,
    /// Runs profiled.
    pub runs: u64,
}

/// Which rows of the outputs a run computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Every position of the step (perplexity, logits of a prompt).
    All,
    /// The last position only (generation): the output head runs on one row.
    Last,
}

/// Ops whose output row `i` depends only on row `i` of their first input, when their
/// other inputs are stored values.
fn row_wise(op: &Op) -> bool {
    matches!(
        op,
        Op::MatMul
            | Op::RmsNorm { .. }
            | Op::Scale { .. }
            | Op::AddScalar { .. }
            | Op::Silu
            | Op::SwiGlu
            | Op::GeluTanh
            | Op::Add
            | Op::Mul
    )
}

/// The first node of the chain of row-wise ops that ends in the graph's one output.
fn row_wise_start(graph: &Graph) -> Option<usize> {
    let [out] = graph.outputs() else {
        return None;
    };
    let nodes = graph.nodes();
    let mut cur = out.0;
    let mut start = None;
    loop {
        let node = &nodes[cur];
        let Some((first, rest)) = node.inputs.split_first() else {
            return start;
        };
        let stored_rest = rest.iter().all(|x| matches!(nodes[x.0].op, Op::Param(_)));
        if !row_wise(&node.op) || !stored_rest {
            return start;
        }
        start = Some(cur);
        cur = first.0;
    }
}

impl Program {
    pub fn new(graph: Graph, device: Device) -> Result<Self> {
        graph.validate()?;
        let mut last_use: Vec<usize> = (0..graph.nodes().len()).collect();
        for (i, node) in graph.nodes().iter().enumerate() {
            for inp in &node.inputs {
                last_use[inp.0] = i;
            }
        }
        for o in graph.outputs() {
            last_use[o.0] = usize::MAX;
        }
        let row_wise_from = row_wise_start(&graph);
        Ok(Program {
            graph,
            device,
            last_use,
            row_wise_from,
            profile: Default::default(),
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A value that outlives the step: cached rows copied out of the cache.
    fn materialize(&self, value: Value, cache: &KvCache) -> Result<Value> {
        Ok(match value {
            Value::Cached(r) => tensor2(
                cache.host_rows(&r)?.to_f32().into_owned(),
                [r.rows, r.width],
                &self.device,
            ),
            v => v,
        })
    }

    /// Starts (or restarts) timing every op of every run.
    pub fn start_profile(&self) {
        if let Ok(mut p) = self.profile.lock() {
            *p = Some(OpProfile::default());
        }
    }

    /// Stops timing and returns what was measured since [`Program::start_profile`].
    pub fn take_profile(&self) -> OpProfile {
        self.profile
            .lock()
            .ok()
            .and_then(|mut p| p.take())
            .unwrap_or_default()
    }

    /// A KV cache for this program.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::for_graph(&self.graph, capacity, &self.device)
    }

    /// A KV cache whose host layers store `ty`.
    pub fn new_cache_of(&self, capacity: usize, ty: KvType) -> Result<KvCache> {
        KvCache::for_graph_of(&self.graph, capacity, &self.device, ty)
    }

    /// Runs one step over `tokens` at positions `cache.len()..`, writing the cache.
    pub fn run(&self, tokens: &[u32], cache: &mut KvCache, taps: &Taps) -> Result<RunOutput> {
        self.run_rows(tokens, cache, taps, Rows::All)
    }

    /// Like [`Program::run`], computing the outputs for `rows` of the step only.
    pub fn run_rows(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        taps: &Taps,
        rows: Rows,
    ) -> Result<RunOutput> {
        // On CPU devices the whole step runs on a worker of rayon's pool, where the
        // CPU kernels and burn-flex split their work: each parallel op then shares it
        // with the other workers directly, instead of handing it over from this thread
        // and sleeping until it is done (two thread switches per op, hundreds of ops
        // per token). GPU backends keep their streams on the calling thread.
        if is_cpu(&self.device) {
            rayon::scope(|_| self.run_step(tokens, cache, taps, rows))
        } else {
            self.run_step(tokens, cache, taps, rows)
        }
    }

    fn run_step(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        taps: &Taps,
        rows: Rows,
    ) -> Result<RunOutput> {
        let past = cache.len();
        let seq = tokens.len();
        if seq == 0 {
            return Err(GraphError::Input("a step needs at least one token".into()));
        }
        if past + seq > cache.capacity() {
            return Err(GraphError::ContextFull {
                past,
                seq,
                max: cache.capacity(),
            });
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [seq]), &self.device);
        let mut step = Step { past, seq, cache };
        let mut timer = self
            .profile
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|_| OpProfile::default()));
        let nodes = self.graph.nodes();
        let mut env: Vec<Option<Value>> = vec![None; nodes.len()];
        let mut captured = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let value = match &node.op {
                Op::Tokens => Value::I1(ids.clone()),
                Op::Param(_) => self
                    .graph
                    .param(&node.name)
                    .cloned()
                    .ok_or_else(|| GraphError::MissingParam(node.name.clone()))?,
                op => {
                    // An input read for the last time is moved, not cloned, so a host
                    // op can take its buffer over instead of copying it.
                    let mut inputs: Vec<Value> = node
                        .inputs
                        .iter()
                        .enumerate()
                        .map(|(k, x)| {
                            let last = self.last_use[x.0] == i && !node.inputs[k + 1..].contains(x);
                            let v = if last {
                                env[x.0].take()
                            } else {
                                env[x.0].clone()
                            };
                            v.expect("inputs precede users and live until their last use")
                        })
                        .collect();
                    if rows == Rows::Last && Some(i) == self.row_wise_from && seq > 1 {
                        if let Value::F2(t) = &inputs[0] {
                            inputs[0] = Value::F2(t.clone().narrow(0, seq - 1, 1));
                        }
                    }
                    if let Some(t) = timer.as_mut() {
                        let start = std::time::Instant::now();
                        let v = eval(&node.name, op, inputs, &self.device, Some(&mut step))?;
                        let kind = if self.graph.outputs().contains(&NodeId(i)) {
                            "output head"
                        } else {
                            op.mnemonic()
                        };
                        let e = t.ops.entry(kind).or_default();
                        e.0 += start.elapsed();
                        e.1 += 1;
                        v
                    } else {
                        eval(&node.name, op, inputs, &self.device, Some(&mut step))?
                    }
                }
            };
            if taps.wants(&node.name, &node.op) {
                let tapped = self.materialize(value.clone(), step.cache)?;
                captured.push((node.name.clone(), tapped));
            }
            env[i] = Some(value);
            for inp in &node.inputs {
                if self.last_use[inp.0] == i {
                    env[inp.0] = None;
                }
            }
        }
        let outputs = self
            .graph
            .outputs()
            .iter()
            .map(|o| self.materialize(env[o.0].take().expect("outputs are kept"), step.cache))
            .collect::<Result<Vec<_>>>()?;
        step.cache.len = past + seq;
        if let Some(t) = timer {
            if let Ok(mut p) = self.profile.lock() {
                if let Some(p) = p.as_mut() {
                    for (k, (d, n)) in t.ops {
                        let e = p.ops.entry(k).or_default();
                        e.0 += d;
                        e.1 += n;
                    }
                    p.runs += 1;
                }
            }
        }
        Ok(RunOutput {
            outputs,
            taps: captured,
        })
    }
}

/// The state a step-dependent op reads: positions and the KV cache.
pub struct Step<'a> {
    pub past: usize,
    pub seq: usize,
    pub cache: &'a mut KvCache,
}

/// burn-flex, the fast CPU backend: where [`crate::cpu`] runs the small ops and the KV
/// cache lives in host memory. burn-ndarray keeps burn's own ops throughout, the
/// portable reference the host versions are checked against.
pub fn is_cpu(device: &Device) -> bool {
    *device == Device::flex()
}

/// A rank-2 float tensor's values on the host, and its shape.
fn host2(node: &str, t: Tensor<2>) -> Result<(Vec<f32>, [usize; 2])> {
    let dims = t.dims();
    Ok((
        Value::F2(t)
            .into_f32_vec()
            .map_err(|e| bad(node, e.to_string()))?,
        dims,
    ))
}

fn tensor2(data: Vec<f32>, dims: [usize; 2], device: &Device) -> Value {
    Value::F2(Tensor::from_data(TensorData::new(data, dims), device))
}

fn bad(node: &str, message: impl Into<String>) -> GraphError {
    GraphError::Invalid {
        node: node.to_string(),
        message: message.into(),
    }
}

fn f2(node: &str, v: Value) -> Result<Tensor<2>> {
    match v {
        Value::F2(t) => Ok(t),
        Value::Cached(r) => Err(bad(
            node,
            format!("cached rows of layer {} where a tensor is needed", r.layer),
        )),
        Value::Quant(m) => Err(bad(
            node,
            format!(
                "{} matrix {}x{} where a tensor is needed",
                m.type_names(),
                m.rows(),
                m.cols()
            ),
        )),
        other => Err(bad(
            node,
            format!("expected a rank-2 float input, got {:?}", other.dims()),
        )),
    }
}

fn binary(
    node: &str,
    a: Value,
    b: Value,
    f: impl Fn(Tensor<2>, Tensor<2>) -> Tensor<2>,
    g: impl Fn(Tensor<1>, Tensor<1>) -> Tensor<1>,
) -> Result<Value> {
    Ok(match (a, b) {
        (Value::F2(a), Value::F2(b)) => Value::F2(f(a, b)),
        (Value::F2(a), Value::F1(b)) => Value::F2(f(a, b.unsqueeze_dim(0))),
        (Value::F1(a), Value::F1(b)) => Value::F1(g(a, b)),
        _ => return Err(bad(node, "unsupported operand ranks")),
    })
}

/// Keys or values for the host attention.
enum AttentionInput<'a> {
    /// Cached rows, read in place.
    Cached(KvRows<'a>),
    /// A prompt's own rows of an f16 cache as computed, after the earlier ones widened;
    /// or the rows of a layer kept as tensors (a sliding window), brought over.
    Host(Vec<f32>),
}

impl<'a> AttentionInput<'a> {
    fn new(
        node: &str,
        x: Value,
        fresh: Option<Vec<f32>>,
        cache: &'a KvCache,
    ) -> Result<AttentionInput<'a>> {
        Ok(match (x, fresh) {
            (Value::Cached(r), None) => AttentionInput::Cached(cache.host_rows(&r)?),
            (Value::Cached(r), Some(new)) => {
                let all = cache.host_rows(&r)?;
                let mut rows = all.first(all.len() - new.len()).to_f32().into_owned();
                rows.extend_from_slice(&new);
                AttentionInput::Host(rows)
            }
            (x, _) => AttentionInput::Host(host2(node, f2(node, x)?)?.0),
        })
    }

    fn rows(&self) -> KvRows<'_> {
        match self {
            AttentionInput::Cached(r) => *r,
            AttentionInput::Host(x) => KvRows::F32(x),
        }
    }
}

/// Evaluates one op on `device`. `step` is `None` during constant folding, where only
/// pure ops run.
pub fn eval(
    node: &str,
    op: &Op,
    inputs: Vec<Value>,
    device: &Device,
    step: Option<&mut Step<'_>>,
) -> Result<Value> {
    let mut it = inputs.into_iter();
    let mut next = || it.next().ok_or_else(|| bad(node, "missing input"));
    Ok(match op {
        Op::Tokens | Op::Param(_) => return Err(bad(node, "source nodes are not evaluated")),
        Op::Embedding => {
            let table = next()?;
            let Value::I1(ids) = next()? else {
                return Err(bad(node, "token ids must be integers"));
            };
            match table {
                // A block-quantized table: only the looked-up rows are widened.
                Value::Quant(table) => {
                    let ids = Value::I1(ids).to_i64_vec()?;
                    let mut rows = Vec::with_capacity(ids.len() * table.cols());
                    for &id in &ids {
                        let r = usize::try_from(id)
                            .ok()
                            .filter(|&r| r < table.rows())
                            .ok_or_else(|| {
                                bad(node, format!("token id {id} is outside the table"))
                            })?;
                        table.dequantize_row(r, &mut rows);
                    }
                    Value::F2(Tensor::from_data(
                        TensorData::new(rows, [ids.len(), table.cols()]),
                        device,
                    ))
                }
                table => Value::F2(f2(node, table)?.select(0, ids)),
            }
        }
        Op::MatMul => {
            let x = f2(node, next()?)?;
            match next()? {
                Value::F2(w) => Value::F2(x.matmul(w.transpose())),
                Value::Quant(w) => {
                    // The block kernels run on the host: bring the activations over and back.
                    let [n, _] = x.dims();
                    let host = Value::F2(x).into_f32_vec()?;
                    let out = crate::quant::matmul(&host, n, &w, crate::quant::Kernel::Auto);
                    Value::F2(Tensor::from_data(
                        TensorData::new(out, [n, w.rows()]),
                        device,
                    ))
                }
                other => {
                    return Err(bad(
                        node,
                        format!("matmul weight of shape {:?} is not a matrix", other.dims()),
                    ))
                }
            }
        }
        Op::RmsNorm { eps } => {
            let x = f2(node, next()?)?;
            let Value::F1(w) = next()? else {
                return Err(bad(node, "norm weight must be rank 1"));
            };
            if is_cpu(device) {
                let (mut x, dims) = host2(node, x)?;
                let w = Value::F1(w).to_f32_vec()?;
                crate::cpu::rms_norm(&mut x, &w, eps.get());
                return Ok(tensor2(x, dims, device));
            }
            let inv = x
                .clone()
                .powi_scalar(2)
                .mean_dim(1)
                .add_scalar(eps.get())
                .sqrt()
                .recip();
            Value::F2(x.mul(inv).mul(w.unsqueeze_dim(0)))
        }
        Op::Add => binary(node, next()?, next()?, |a, b| a.add(b), |a, b| a.add(b))?,
        Op::Mul => binary(node, next()?, next()?, |a, b| a.mul(b), |a, b| a.mul(b))?,
        Op::Scale { factor } => match next()? {
            Value::F1(t) => Value::F1(t.mul_scalar(factor.get())),
            Value::F2(t) => Value::F2(t.mul_scalar(factor.get())),
            _ => return Err(bad(node, "scale needs a float tensor")),
        },
        Op::AddScalar { value } => match next()? {
            Value::F1(t) => Value::F1(t.add_scalar(value.get())),
            Value::F2(t) => Value::F2(t.add_scalar(value.get())),
            _ => return Err(bad(node, "add_scalar needs a float tensor")),
        },
        Op::Silu if is_cpu(device) => {
            let (mut x, dims) = host2(node, f2(node, next()?)?)?;
            crate::cpu::silu(&mut x);
            tensor2(x, dims, device)
        }
        Op::Silu => Value::F2(activation::silu(f2(node, next()?)?)),
        Op::SwiGlu if is_cpu(device) => {
            let (mut x, [rows, width]) = host2(node, f2(node, next()?)?)?;
            crate::cpu::swiglu(&mut x, width / 2);
            tensor2(x, [rows, width / 2], device)
        }
        Op::SwiGlu => {
            let x = f2(node, next()?)?;
            let n = x.dims()[1] / 2;
            let (gate, up) = (x.clone().narrow(1, 0, n), x.narrow(1, n, n));
            Value::F2(activation::silu(gate).mul(up))
        }
        Op::GeluTanh => Value::F2(activation::gelu_approximate(f2(node, next()?)?)),
        Op::Cos => Value::F2(f2(node, next()?)?.cos()),
        Op::Sin => Value::F2(f2(node, next()?)?.sin()),
        Op::Slice { axis, start, len } => match next()? {
            Value::F1(t) => Value::F1(t.narrow(*axis, *start, *len)),
            Value::F2(t) => Value::F2(t.narrow(*axis, *start, *len)),
            Value::I1(t) => Value::I1(t.narrow(*axis, *start, *len)),
            Value::Quant(m) if *axis == 0 => Value::Quant(std::sync::Arc::new(
                m.slice_rows(*start, *len)
                    .ok_or_else(|| bad(node, "row slice past the end of the matrix"))?,
            )),
            Value::Quant(_) => return Err(bad(node, "a block matrix is sliced by rows only")),
            Value::Cached(_) => return Err(bad(node, "cannot slice cached rows")),
        },
        Op::Concat { axis } => {
            let mut all = Vec::new();
            let mut ones = Vec::new();
            let mut blocks = Vec::new();
            while let Ok(v) = next() {
                match v {
                    Value::F2(t) => all.push(t),
                    Value::F1(t) => ones.push(t),
                    Value::Quant(m) => blocks.push(m),
                    _ => return Err(bad(node, "concat needs float tensors")),
                }
            }
            match (all.is_empty(), ones.is_empty(), blocks.is_empty()) {
                (false, true, true) => Value::F2(Tensor::cat(all, *axis)),
                (true, false, true) => Value::F1(Tensor::cat(ones, *axis)),
                (true, true, false) if *axis == 0 => {
                    // Rows of block matrices: joined by reference, no bytes copied.
                    let parts: Vec<&crate::quant::QMatrix> = blocks.iter().map(|m| &**m).collect();
                    Value::Quant(std::sync::Arc::new(
                        crate::quant::QMatrix::concat(&parts)
                            .ok_or_else(|| bad(node, "block matrices of different widths"))?,
                    ))
                }
                _ => return Err(bad(node, "concat operands must share a rank and a storage")),
            }
        }
        Op::RopeAngles {
            head_dim,
            theta,
            scaling,
            max_positions,
        } => {
            let angles = rope_angles(*head_dim, theta.get(), *scaling, *max_positions);
            Value::F2(Tensor::from_data(
                TensorData::new(angles, [*max_positions, head_dim / 2]),
                device,
            ))
        }
        Op::Rope { head_dim } => {
            let step = step.ok_or_else(|| bad(node, "rope needs a step"))?;
            let x = f2(node, next()?)?;
            let cos = f2(node, next()?)?;
            let sin = f2(node, next()?)?;
            if is_cpu(device) {
                let seq = x.dims()[0];
                if step.past + seq > cos.dims()[0] {
                    return Err(bad(
                        node,
                        format!(
                            "position {} is past the rope table of {} positions",
                            step.past + seq - 1,
                            cos.dims()[0]
                        ),
                    ));
                }
                let (mut x, dims) = host2(node, x)?;
                let (cos, _) = host2(node, cos.narrow(0, step.past, seq))?;
                let (sin, _) = host2(node, sin.narrow(0, step.past, seq))?;
                crate::cpu::rope(&mut x, &cos, &sin, *head_dim);
                return Ok(tensor2(x, dims, device));
            }
            Value::F2(rope(x, cos, sin, *head_dim, step.past, node)?)
        }
        Op::KvAppend { layer, kind, .. } => {
            let step = step.ok_or_else(|| bad(node, "kv_append needs a step"))?;
            let rows = f2(node, next()?)?;
            step.cache.append(*layer, *kind, step.past, rows)?
        }
        Op::Attention {
            n_heads,
            n_kv_heads,
            head_dim,
            scale,
            window,
        } => {
            let step = step.ok_or_else(|| bad(node, "attention needs a step"))?;
            let q = f2(node, next()?)?;
            let (k, v) = (next()?, next()?);
            if is_cpu(device) {
                let (q, dims) = host2(node, q)?;
                let fresh = |x: &Value, cache: &mut KvCache| match x {
                    Value::Cached(r) => cache.take_fresh(r),
                    _ => None,
                };
                let (fresh_k, fresh_v) = (fresh(&k, step.cache), fresh(&v, step.cache));
                let cache = &*step.cache;
                let k = AttentionInput::new(node, k, fresh_k, cache)?;
                let v = AttentionInput::new(node, v, fresh_v, cache)?;
                let shape = crate::cpu::AttentionShape {
                    n_heads: *n_heads,
                    n_kv_heads: *n_kv_heads,
                    head_dim: *head_dim,
                    scale: scale.get(),
                    window: *window,
                    past: step.past,
                };
                return Ok(tensor2(
                    crate::cpu::attention(&q, k.rows(), v.rows(), &shape),
                    dims,
                    device,
                ));
            }
            let (k, v) = (f2(node, k)?, f2(node, v)?);
            let heads = Heads {
                n_heads: *n_heads,
                n_kv_heads: *n_kv_heads,
                head_dim: *head_dim,
            };
            Value::F2(attention(
                q,
                k,
                v,
                heads,
                scale.get(),
                *window,
                step,
                device,
            ))
        }
    })
}

/// Rotary angles `[max_positions, head_dim / 2]`, computed in f32 as HF transformers does
/// (`inv_freq = 1 / theta^(2i/d)`, then `position * inv_freq`), with its scaling rules.
pub fn rope_angles(
    head_dim: usize,
    theta: f32,
    scaling: RopeScaling,
    max_positions: usize,
) -> Vec<f32> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let base = 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32);
            match scaling {
                RopeScaling::None => base,
                RopeScaling::Linear { factor } => base / factor.get(),
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_positions,
                } => {
                    // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
                    // and the band between is interpolated (HF `_compute_llama3_parameters`).
                    let (factor, low, high) =
                        (factor.get(), low_freq_factor.get(), high_freq_factor.get());
                    let old = original_max_positions as f32;
                    let wavelen = 2.0 * std::f32::consts::PI / base;
                    if wavelen < old / high {
                        base
                    } else if wavelen > old / low {
                        base / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * base / factor + smooth * base
                    }
                }
            }
        })
        .collect();
    let mut out = Vec::with_capacity(max_positions * half);
    for p in 0..max_positions {
        out.extend(inv_freq.iter().map(|f| p as f32 * f));
    }
    out
}

/// Rotate-half RoPE on `x [seq, heads * head_dim]` at positions `past..past+seq`.
fn rope(
    x: Tensor<2>,
    cos: Tensor<2>,
    sin: Tensor<2>,
    head_dim: usize,
    past: usize,
    node: &str,
) -> Result<Tensor<2>> {
    let [seq, width] = x.dims();
    let positions = cos.dims()[0];
    if past + seq > positions {
        return Err(bad(
            node,
            format!(
                "position {} is past the rope table of {positions} positions",
                past + seq - 1
            ),
        ));
    }
    let (heads, half) = (width / head_dim, head_dim / 2);
    let c = cos.narrow(0, past, seq).unsqueeze_dim::<3>(1); // [seq, 1, half]
    let s = sin.narrow(0, past, seq).unsqueeze_dim::<3>(1);
    let x = x.reshape([seq, heads, head_dim]);
    let x1 = x.clone().narrow(2, 0, half);
    let x2 = x.narrow(2, half, half);
    let o1 = x1.clone().mul(c.clone()).sub(x2.clone().mul(s.clone()));
    let o2 = x2.mul(c).add(x1.mul(s));
    Ok(Tensor::cat(vec![o1, o2], 2).reshape([seq, width]))
}

/// Head layout of an attention op.
struct Heads {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// Causal attention of `seq` queries over the last `rows` positions' keys, with query
/// heads grouped over KV heads (GQA: head `h` reads KV head `h / (n_heads / n_kv_heads)`)
/// and, with a window, each query seeing only the last `window` positions.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: Tensor<2>,
    k: Tensor<2>,
    v: Tensor<2>,
    heads: Heads,
    scale: f32,
    window: Option<usize>,
    step: &Step<'_>,
    device: &Device,
) -> Tensor<2> {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    } = heads;
    let (seq, past) = (step.seq, step.past);
    let rows = k.dims()[0];
    let group = n_heads / n_kv_heads;
    // Fold each KV group's query heads into the row axis so K and V are never repeated:
    // [seq, heads*hd] -> [kv_heads, group*seq, hd], rows ordered (g, i).
    let q = q
        .reshape([seq, n_kv_heads, group, head_dim])
        .permute([1, 2, 0, 3])
        .reshape([n_kv_heads, group * seq, head_dim]);
    let k = k.reshape([rows, n_kv_heads, head_dim]).swap_dims(0, 1); // [kv, rows, hd]
    let v = v.reshape([rows, n_kv_heads, head_dim]).swap_dims(0, 1);
    let mut scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale); // [kv, group*seq, rows]
                                                                    // Query i sits at position past + i; key j at past + seq - rows + j.
    let first_key = past + seq - rows;
    let visible = |i: usize, j: usize| {
        let (qp, kp) = (past + i, first_key + j);
        kp <= qp && window.is_none_or(|w| qp - kp < w)
    };
    let all_visible = (0..seq).all(|i| (0..rows).all(|j| visible(i, j)));
    if !all_visible {
        let mask: Vec<bool> = (0..group * seq)
            .flat_map(|r| (0..rows).map(move |j| (r % seq, j)))
            .map(|(i, j)| !visible(i, j))
            .collect();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask, [group * seq, rows]), device)
            .unsqueeze_dim::<3>(0)
            .expand([n_kv_heads, group * seq, rows]);
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    let probs = activation::softmax(scores, 2);
    probs
        .matmul(v) // [kv, group*seq, hd]
        .reshape([n_kv_heads, group, seq, head_dim])
        .permute([2, 0, 1, 3])
        .reshape([seq, n_heads * head_dim])
}
