//! Where weights come from, and the one table from checkpoint names to ours.
//!
//! Our names are llama.cpp's GGUF names (`blk.3.attn_q.weight`), so GGUF checkpoints map
//! one to one and HF checkpoints go through [`hf_to_ours`].
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use llama_graph::quant::QMatrix;

use crate::error::{ModelError, Result};
use crate::registry::Family;

/// A tensor read from a checkpoint, as f32 on the host, row-major.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A checkpoint: tensors by checkpoint name.
pub trait TensorSource {
    /// The file(s), for error messages.
    fn describe(&self) -> String;
    fn names(&self) -> Vec<String>;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    fn load(&self, name: &str) -> Result<Option<HostTensor>>;
    /// The name under which this checkpoint stores one of our tensors (`ours` itself
    /// unless the checkpoint uses other names), for error messages.
    fn checkpoint_name(&self, ours: &str) -> String {
        ours.to_string()
    }
    /// The file that holds checkpoint tensor `name`, for error messages.
    fn describe_tensor(&self, _name: &str) -> String {
        self.describe()
    }
    /// A matrix kept in its stored GGML blocks, if it is stored that way.
    fn load_blocks(&self, _name: &str) -> Result<Option<QMatrix>> {
        Ok(None)
    }
    /// Every tensor as stored: name, element type, shape, bytes.
    fn inventory(&self) -> Vec<TensorInfo>;
}

/// A tensor as a checkpoint stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// `F32`, `BF16`, `Q4_1`, ...
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// A weight matrix `[rows, cols]`: a burn tensor, or GGML blocks kept as the checkpoint
/// stores them (for the CPU block kernels; never widened to f32).
#[derive(Module, Debug)]
pub enum Matrix {
    Dense(Param<Tensor<2>>),
    Blocks(BlockMatrix),
}

impl Matrix {
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Matrix::Dense(p) => p.val().dims(),
            Matrix::Blocks(b) => [b.0.rows(), b.0.cols()],
        }
    }

    /// Rows `start..start + len` (the parts of a fused checkpoint matrix).
    pub fn rows(&self, start: usize, len: usize) -> Result<Matrix> {
        Ok(match self {
            Matrix::Dense(p) => Matrix::Dense(Param::from_tensor(p.val().narrow(0, start, len))),
            Matrix::Blocks(b) => Matrix::Blocks(BlockMatrix(Arc::new(
                b.0.slice_rows(start, len)
                    .ok_or_else(|| ModelError::TensorShape {
                        name: "rows of a block matrix".into(),
                        expected: vec![start + len, b.0.cols()],
                        actual: vec![b.0.rows(), b.0.cols()],
                    })?,
            ))),
        })
    }

    /// The graph value: the tensor, or the blocks.
    pub fn value(&self) -> llama_graph::Value {
        match self {
            Matrix::Dense(p) => llama_graph::Value::F2(p.val()),
            Matrix::Blocks(b) => llama_graph::Value::Quant(b.0.clone()),
        }
    }
}

/// GGML blocks in host memory: a module with no burn parameters (it lives outside
/// any device and is not trained or saved as a record).
#[derive(Clone, Debug)]
pub struct BlockMatrix(pub Arc<QMatrix>);

impl Module for BlockMatrix {
    fn collect_devices(&self, devices: burn::module::Devices) -> burn::module::Devices {
        devices
    }
    fn fork(self, _: &Device) -> Self {
        self
    }
    fn to_device(self, _: &Device) -> Self {
        self
    }
    fn train(self) -> Self {
        self
    }
    fn valid(&self) -> Self {
        self.clone()
    }
    fn materialize(self) -> Self {
        self
    }
    fn visit<V: burn::module::ModuleVisitor>(&self, _: &mut V) {}
    fn map<M: burn::module::ModuleMapper>(self, _: &mut M) -> Self {
        self
    }
}

impl burn::module::ModuleDisplayDefault for BlockMatrix {
    fn content(&self, content: burn::module::Content) -> Option<burn::module::Content> {
        content.add_single(&format!("{:?}", self.0)).optional()
    }
}

impl burn::module::ModuleDisplay for BlockMatrix {}

/// Whole-model tensors: (HF name, our name).
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Per-layer tensors: (HF name after `model.layers.N.`, ours after `blk.N.`).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.gate_proj.bias", "ffn_gate.bias"),
    ("mlp.up_proj.bias", "ffn_up.bias"),
    ("mlp.down_proj.bias", "ffn_down.bias"),
    // Per-head Q/K norms (Gemma 3) and the norms around Gemma 3's feed-forward (its
    // `post_attention_layernorm` is a family rename: see `Family::layer_renames`).
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
    // Phi-3's fused matrices, under llama.cpp's names for them.
    ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    ("mlp.gate_up_proj.weight", "ffn_up.weight"),
];

/// Every name `name` maps to, in table order.
fn translate(name: &str, from_prefix: &str, to_prefix: &str, hf_to_ours: bool) -> Vec<String> {
    let pick = |(hf, ours): &(&'static str, &'static str)| {
        if hf_to_ours {
            (*hf, *ours)
        } else {
            (*ours, *hf)
        }
    };
    let global: Vec<String> = GLOBAL_NAMES
        .iter()
        .map(pick)
        .filter(|(from, _)| *from == name)
        .map(|(_, to)| to.to_string())
        .collect();
    if !global.is_empty() {
        return global;
    }
    let Some((layer, leaf)) = name
        .strip_prefix(from_prefix)
        .and_then(|rest| rest.split_once('.'))
    else {
        return Vec::new();
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return Vec::new();
    };
    LAYER_NAMES
        .iter()
        .map(pick)
        .filter(|(from, _)| *from == leaf)
        .map(|(_, to)| format!("{to_prefix}{layer}.{to}"))
        .collect()
}

/// Maps an HF checkpoint name to ours; `None` for names we do not use.
pub fn hf_to_ours(name: &str) -> Option<String> {
    translate(name, "model.layers.", "blk.", true)
        .into_iter()
        .next()
}

/// [`hf_to_ours`] for a checkpoint of `family`, whose own meanings of some names
/// ([`Family::layer_renames`]) come first.
pub fn hf_to_ours_in(family: Family, name: &str) -> Option<String> {
    let renamed = name.strip_prefix("model.layers.").and_then(|rest| {
        let (layer, leaf) = rest.split_once('.')?;
        let layer = layer.parse::<usize>().ok()?;
        let (_, ours) = family.layer_renames().iter().find(|(hf, _)| *hf == leaf)?;
        Some(format!("blk.{layer}.{ours}"))
    });
    renamed.or_else(|| hf_to_ours(name))
}

/// Maps one of our names to the HF checkpoint name (the unfused one where a fused
/// matrix shares our name: `ffn_up.weight` is `mlp.up_proj.weight`).
pub fn ours_to_hf(name: &str) -> Option<String> {
    translate(name, "blk.", "model.layers.", false)
        .into_iter()
        .next()
}

/// Every HF checkpoint name that maps to one of ours (`ffn_up.weight`: `up_proj`, and
/// Phi-3's `gate_up_proj`).
pub fn ours_to_hf_all(name: &str) -> Vec<String> {
    translate(name, "blk.", "model.layers.", false)
}

/// Tensors that checkpoints may carry but that no family reads, by name suffix: the RoPE
/// frequencies that transformers before 4.31 saved with every layer (we compute them
/// from the config), and BERT's position ids `0..max_positions`.
const BUFFERS: &[&str] = &["rotary_emb.inv_freq", "embeddings.position_ids"];

/// Reads weights by our names from a checkpoint, checking every shape against the config,
/// and records what it read so that [`WeightLoader::check_all_used`] can refuse a
/// checkpoint with tensors no family weight consumes.
pub struct WeightLoader<'a> {
    source: &'a dyn TensorSource,
    /// Called with (tensors loaded, tensors in the checkpoint) after each tensor.
    progress: Option<&'a dyn Fn(usize, usize)>,
    loaded: std::cell::Cell<usize>,
    total: usize,
    /// Our name to checkpoint names: one, or several where a checkpoint holds both a
    /// fused and an unfused matrix of one name of ours (`gate_up_proj`, `up_proj`).
    table: std::collections::HashMap<String, Vec<String>>,
    /// Checkpoint names read so far.
    used: RefCell<BTreeSet<String>>,
    /// Checkpoint names a family leaves unread on purpose ([`WeightLoader::ignore`]).
    ignored: RefCell<BTreeSet<String>>,
    device: Device,
    /// Keep matrices stored as GGML blocks in their blocks.
    keep_blocks: bool,
    /// Refuse tensors holding NaN or infinity.
    check_tensors: bool,
}

impl<'a> WeightLoader<'a> {
    /// A loader of `family`'s weights from `source`.
    pub fn new(source: &'a dyn TensorSource, device: &Device, family: Family) -> Self {
        let mut table = std::collections::HashMap::<String, Vec<String>>::new();
        for n in source.names() {
            table
                .entry(hf_to_ours_in(family, &n).unwrap_or_else(|| n.clone()))
                .or_default()
                .push(n);
        }
        let total = table.len();
        WeightLoader {
            source,
            progress: None,
            loaded: std::cell::Cell::new(0),
            total,
            table,
            used: RefCell::default(),
            ignored: RefCell::default(),
            device: device.clone(),
            keep_blocks: false,
            check_tensors: false,
        }
    }

    /// Keeps matrices that the checkpoint stores as GGML blocks (Q8_0, Q4_0, Q4_1, Q5_0,
    /// Q5_1, Q4_K, Q5_K, Q6_K) in those blocks, read in place, for the CPU block kernels; without it every
    /// weight is widened to f32 on the device.
    pub fn keep_blocks(mut self, keep: bool) -> Self {
        self.keep_blocks = keep;
        self
    }

    /// Refuses, by name, a tensor holding NaN or infinity.
    pub fn check_tensors(mut self, check: bool) -> Self {
        self.check_tensors = check;
        self
    }

    fn check_finite(&self, ours: &str, values: &[f32], offset: usize) -> Result<()> {
        match values.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(ModelError::NonFiniteTensor {
                name: ours.to_string(),
                index: offset + i,
                value: values[i],
            }),
            None => Ok(()),
        }
    }

    /// Reports progress to `f` as tensors load.
    pub fn with_progress(mut self, f: &'a dyn Fn(usize, usize)) -> Self {
        self.progress = Some(f);
        self
    }

    pub fn contains(&self, ours: &str) -> bool {
        self.table.contains_key(ours)
    }

    /// Leaves tensor `ours` unread on purpose, if the checkpoint has it: an output head
    /// that config.json ties to the embeddings (transformers then ignores the stored one).
    pub fn ignore(&self, ours: &str) {
        if let Some(names) = self.table.get(ours) {
            self.ignored.borrow_mut().extend(names.iter().cloned());
        }
    }

    /// Once `family` has loaded its weights: every tensor of the checkpoint was read,
    /// ignored on purpose, or is a buffer no family reads ([`BUFFERS`]). Otherwise an
    /// error names the first other one, with what the family read.
    pub fn check_all_used(&self, family: Family) -> Result<()> {
        let (used, ignored) = (self.used.borrow(), self.ignored.borrow());
        let mut unused: Vec<String> = self
            .source
            .names()
            .into_iter()
            .filter(|n| {
                !used.contains(n) && !ignored.contains(n) && !BUFFERS.iter().any(|b| n.ends_with(b))
            })
            .collect();
        unused.sort();
        let Some(first) = unused.first() else {
            return Ok(());
        };
        Err(ModelError::UnusedTensor {
            path: self.source.describe_tensor(first).into(),
            name: first.clone(),
            more: unused.len() - 1,
            family: family.hf_name(),
            expected: expected_names(&used),
        })
    }

    fn missing(&self, ours: &str) -> ModelError {
        ModelError::MissingTensor {
            name: self.source.checkpoint_name(ours),
            path: self.source.describe().into(),
        }
    }

    /// The checkpoint tensor to read for `ours` of `shape`: where several have our name,
    /// the one of that shape (the others are left to [`WeightLoader::check_all_used`]).
    fn checkpoint_name(&self, ours: &str, shape: &[usize]) -> Result<&String> {
        let names = self.table.get(ours).ok_or_else(|| self.missing(ours))?;
        Ok(names
            .iter()
            .find(|n| self.source.shape(n).as_deref() == Some(shape))
            .unwrap_or(&names[0]))
    }

    fn loaded_one(&self, name: &str) {
        self.used.borrow_mut().insert(name.to_string());
        self.loaded.set(self.loaded.get() + 1);
        if let Some(f) = self.progress {
            f(self.loaded.get(), self.total);
        }
    }

    fn host(&self, ours: &str, expected: &[usize]) -> Result<HostTensor> {
        let name = self.checkpoint_name(ours, expected)?;
        let t = self.source.load(name)?.ok_or_else(|| self.missing(ours))?;
        self.loaded_one(name);
        if self.check_tensors {
            self.check_finite(ours, &t.data, 0)?;
        }
        if t.shape != expected {
            return Err(ModelError::TensorShape {
                name: ours.to_string(),
                expected: expected.to_vec(),
                actual: t.shape,
            });
        }
        Ok(t)
    }

    /// A vector weight `[n]`.
    pub fn vector(&self, ours: &str, n: usize) -> Result<Param<Tensor<1>>> {
        let t = self.host(ours, &[n])?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(t.data, [n]),
            &self.device,
        )))
    }

    /// A vector computed from the config rather than read (Llama 3.1's RoPE factors
    /// from config.json), on the loader's device.
    pub fn computed(&self, data: Vec<f32>) -> Param<Tensor<1>> {
        let n = data.len();
        Param::from_tensor(Tensor::from_data(TensorData::new(data, [n]), &self.device))
    }

    /// A projection `[out, in]`, kept in the checkpoint layout (the graph's matmul
    /// computes `x @ w^T`).
    pub fn linear(&self, ours: &str, d_in: usize, d_out: usize) -> Result<Matrix> {
        self.table(ours, d_out, d_in)
    }

    /// A table stored as it is, `[rows, cols]` (embeddings).
    pub fn table(&self, ours: &str, rows: usize, cols: usize) -> Result<Matrix> {
        if self.keep_blocks {
            let name = self.checkpoint_name(ours, &[rows, cols])?;
            if let Some(m) = self.source.load_blocks(name)? {
                self.loaded_one(name);
                if [m.rows(), m.cols()] != [rows, cols] {
                    return Err(ModelError::TensorShape {
                        name: ours.to_string(),
                        expected: vec![rows, cols],
                        actual: vec![m.rows(), m.cols()],
                    });
                }
                if self.check_tensors {
                    let mut row = Vec::with_capacity(cols);
                    for r in 0..rows {
                        row.clear();
                        m.dequantize_row(r, &mut row);
                        self.check_finite(ours, &row, r * cols)?;
                    }
                }
                return Ok(Matrix::Blocks(BlockMatrix(Arc::new(m))));
            }
        }
        let t = self.host(ours, &[rows, cols])?;
        Ok(Matrix::Dense(Param::from_tensor(Tensor::from_data(
            TensorData::new(t.data, [rows, cols]),
            &self.device,
        ))))
    }
}

/// What a family read, for an error message: every name when there are few, else the
/// whole-model tensors and layer 0's (every layer holds the same) and the count.
fn expected_names(used: &BTreeSet<String>) -> String {
    const FEW: usize = 16;
    if used.len() <= FEW {
        return used.iter().cloned().collect::<Vec<_>>().join(", ");
    }
    let layer = |name: &str| {
        let ours = hf_to_ours(name).unwrap_or_else(|| name.to_string());
        let rest = ours.strip_prefix("blk.")?;
        rest.split_once('.')?.0.parse::<usize>().ok()
    };
    let shown: Vec<&str> = used
        .iter()
        .map(String::as_str)
        .filter(|n| layer(n).is_none_or(|l| l == 0))
        .collect();
    format!(
        "{}, and the same as layer 0's for every other layer: {} in all",
        shown.join(", "),
        used.len()
    )
}
