//! The executor: a [`Program`] is a graph compiled for one device, each node given a
//! lowering once (burn ops, [`lower_burn`], or our host kernels, [`lower_host`]); it runs
//! steps that write a [`KvCache`] ([`kv`]).
use std::collections::BTreeSet;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::capabilities::Capabilities;
use crate::error::{GraphError, Result};
use crate::graph::Graph;
use crate::ir::{NodeId, Op};
use crate::value::Value;

mod kv;
mod lower_burn;
mod lower_host;

pub use kv::{CachedRows, KvCache, KvSnapshot, KvType, LayerSnapshot, PageCount};
pub use lower_burn::{eval, rope_angles};

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
    capabilities: Capabilities,
    /// How each node runs, chosen once here.
    lowering: Vec<Lowering>,
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
    /// The last `n` positions of each sequence (all of a shorter one): what verifying
    /// a speculative draft needs, the logits after the sequence's last token and after
    /// each drafted token, while a prompt chunk in the same step runs the head on
    /// `n` rows instead of its whole length.
    LastN(usize),
}

impl Rows {
    /// The output rows of a sequence of `seq` tokens.
    pub fn of(self, seq: usize) -> usize {
        match self {
            Rows::All => seq,
            Rows::Last => seq.min(1),
            Rows::LastN(n) => seq.min(n.max(1)),
        }
    }
}

/// Ops whose output row `i` depends only on row `i` of their first input, when their
/// other inputs are stored values.
fn row_wise(op: &Op) -> bool {
    matches!(
        op,
        Op::MatMul
            | Op::RmsNorm { .. }
            | Op::LayerNorm { .. }
            | Op::Scale { .. }
            | Op::AddScalar { .. }
            | Op::Silu
            | Op::SwiGlu
            | Op::GeluTanh
            | Op::Gelu
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

/// How a node runs: chosen once per node when a [`Program`] is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lowering {
    /// burn tensor ops on the device ([`eval`]).
    Burn,
    /// Our host kernels (`llama-kernels`) over host memory.
    Host,
}

/// Whether node `id` yields a matrix of GGML blocks: a stored one, or row slices and
/// concatenations of stored ones.
fn yields_blocks(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    match node.op {
        Op::Param(_) => matches!(graph.param(&node.name), Some(Value::Quant(_))),
        Op::Slice { .. } | Op::Concat { .. } => {
            !node.inputs.is_empty() && node.inputs.iter().all(|&x| yields_blocks(graph, x))
        }
        _ => false,
    }
}

impl Program {
    /// Compiles `graph` for `device`: each node's lowering is chosen here, once. Devices
    /// whose [`Capabilities`] have host kernels run norms, RoPE, SiLU/SwiGLU and
    /// attention on them; a matmul whose weight is stored as GGML blocks always runs
    /// the block kernels (there is no burn op for blocks; the engine's policy keeps
    /// blocks only where host kernels run); everything else is burn's.
    pub fn new(graph: Graph, device: Device) -> Result<Self> {
        graph.validate()?;
        let capabilities = Capabilities::of(&device);
        let lowering = graph
            .nodes()
            .iter()
            .map(|node| match &node.op {
                Op::MatMul
                    if node
                        .inputs
                        .get(1)
                        .is_some_and(|&w| yields_blocks(&graph, w)) =>
                {
                    Lowering::Host
                }
                op if capabilities.host_kernels && lower_host::lowers(op) => Lowering::Host,
                _ => Lowering::Burn,
            })
            .collect();
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
            capabilities,
            lowering,
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

    /// What the device can run, as this program was compiled for it.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// How node `id` runs.
    pub fn lowering(&self, id: NodeId) -> Lowering {
        self.lowering[id.0]
    }

    /// The names of the nodes that run on host kernels, in graph order: none on
    /// devices without host kernels unless the graph holds block weights.
    pub fn host_nodes(&self) -> Vec<&str> {
        self.graph
            .nodes()
            .iter()
            .zip(&self.lowering)
            .filter(|(_, l)| **l == Lowering::Host)
            .map(|(n, _)| n.name.as_str())
            .collect()
    }

    /// Evaluates node `i` with its lowering.
    fn eval(&self, i: usize, op: &Op, inputs: Vec<Value>, step: &mut Step<'_>) -> Result<Value> {
        let name = &self.graph.nodes()[i].name;
        match self.lowering[i] {
            Lowering::Burn => eval(name, op, inputs, &self.device, Some(step)),
            Lowering::Host => lower_host::eval(name, op, inputs, &self.device, step),
        }
    }

    /// A value that outlives the step: cached rows copied out of the cache; per
    /// sequence values, one after the other.
    fn materialize(&self, value: Value, step: &Step<'_>) -> Result<Value> {
        let copy = |r: &CachedRows, cache: &KvCache| -> Result<Value> {
            Ok(tensor2(
                cache.host_values(r)?,
                [r.rows, r.width],
                &self.device,
            ))
        };
        Ok(match value {
            Value::Cached(r) => copy(&r, step.parts[0].cache)?,
            Value::PerSequence(values) => {
                let mut rows = Vec::with_capacity(values.len());
                for (v, p) in values.into_iter().zip(&step.parts) {
                    rows.push(match v {
                        Value::Cached(r) => f2("", copy(&r, p.cache)?)?,
                        v => f2("", v)?,
                    });
                }
                Value::F2(Tensor::cat(rows, 0))
            }
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
        self.run_batch(&mut [Sequence { tokens, cache }], taps, rows)
    }

    /// Runs one step over several sequences at once: each brings its new tokens (one
    /// to decode, or a chunk of a prompt) and its own KV cache. Their rows go through
    /// every row-wise op together (each weight is read once for the whole step);
    /// RoPE takes each row's own position, and each sequence appends to its own cache
    /// and attends over its own keys. The outputs hold the sequences' rows in order:
    /// every row with [`Rows::All`], each sequence's last row with [`Rows::Last`], its
    /// last rows with [`Rows::LastN`] ([`Rows::of`] says how many).
    ///
    /// Validated before anything runs; if the step fails, no cache has advanced.
    pub fn run_batch(
        &self,
        seqs: &mut [Sequence<'_>],
        taps: &Taps,
        rows: Rows,
    ) -> Result<RunOutput> {
        if seqs.is_empty() {
            return Err(GraphError::Input(
                "a step needs at least one sequence".into(),
            ));
        }
        let mut offset = 0;
        let mut parts = Vec::with_capacity(seqs.len());
        let mut ids = Vec::new();
        for s in seqs.iter_mut() {
            let (past, seq) = (s.cache.len(), s.tokens.len());
            if seq == 0 {
                return Err(GraphError::Input("a step needs at least one token".into()));
            }
            if past + seq > s.cache.capacity() {
                return Err(GraphError::ContextFull {
                    past,
                    seq,
                    max: s.cache.capacity(),
                });
            }
            ids.extend(s.tokens.iter().map(|&t| t as i64));
            parts.push(Part {
                past,
                seq,
                offset,
                cache: &mut *s.cache,
            });
            offset += seq;
        }
        let mut step = Step { parts };
        // On CPU devices the whole step runs on a worker of rayon's pool, where the
        // CPU kernels and burn-flex split their work: each parallel op then shares it
        // with the other workers directly, instead of handing it over from this thread
        // and sleeping until it is done (two thread switches per op, hundreds of ops
        // per token). GPU backends keep their streams on the calling thread.
        if self.capabilities.host_kernels {
            rayon::scope(|_| self.run_step(ids, &mut step, taps, rows))
        } else {
            self.run_step(ids, &mut step, taps, rows)
        }
    }

    fn run_step(
        &self,
        ids: Vec<i64>,
        step: &mut Step<'_>,
        taps: &Taps,
        rows: Rows,
    ) -> Result<RunOutput> {
        let tokens = ids.len();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens]), &self.device);
        // The rows the output head needs unless it needs all: each sequence's last
        // (or last few).
        let last_rows: Vec<usize> = step
            .parts
            .iter()
            .flat_map(|p| {
                let n = rows.of(p.seq);
                p.offset + p.seq - n..p.offset + p.seq
            })
            .collect();
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
                    if rows != Rows::All
                        && Some(i) == self.row_wise_from
                        && tokens > last_rows.len()
                    {
                        if let Value::F2(t) = &inputs[0] {
                            inputs[0] = Value::F2(select_rows(t.clone(), &last_rows, &self.device));
                        }
                    }
                    if let Some(t) = timer.as_mut() {
                        let start = std::time::Instant::now();
                        let v = self.eval(i, op, inputs, step)?;
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
                        self.eval(i, op, inputs, step)?
                    }
                }
            };
            if taps.wants(&node.name, &node.op) {
                let tapped = self.materialize(value.clone(), step)?;
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
            .map(|o| self.materialize(env[o.0].take().expect("outputs are kept"), step))
            .collect::<Result<Vec<_>>>()?;
        for p in step.parts.iter_mut() {
            p.cache.set_len(p.past + p.seq);
        }
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

/// One sequence of a batched step ([`Program::run_batch`]): its new tokens, run at
/// positions `cache.len()..`, and its KV cache.
pub struct Sequence<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// One sequence's share of a step: its positions, where its rows start among the
/// step's rows, and its cache.
pub struct Part<'a> {
    /// Positions cached before this step.
    pub past: usize,
    /// Tokens of this sequence in the step.
    pub seq: usize,
    /// Its first row among the step's rows.
    pub offset: usize,
    pub cache: &'a mut KvCache,
}

/// The state a step-dependent op reads: each sequence's positions and KV cache.
pub struct Step<'a> {
    pub parts: Vec<Part<'a>>,
}

impl Step<'_> {
    /// Each sequence's (first position, tokens), in row order.
    pub fn positions(&self) -> Vec<(usize, usize)> {
        self.parts.iter().map(|p| (p.past, p.seq)).collect()
    }
}

/// Rows `rows` of `t`, in that order.
fn select_rows(t: Tensor<2>, rows: &[usize], device: &Device) -> Tensor<2> {
    if let [r] = rows {
        return t.narrow(0, *r, 1);
    }
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), device);
    t.select(0, idx)
}

/// Rows `offset..offset + n` of a value that holds every row of a step, or the whole
/// value when it is one sequence's already.
fn rows_of(t: &Tensor<2>, offset: usize, n: usize) -> Tensor<2> {
    if offset == 0 && t.dims()[0] == n {
        t.clone()
    } else {
        t.clone().narrow(0, offset, n)
    }
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
