//! GGUF files: metadata of every value type, tensor infos, alignment, memory-mapped data.
//!
//! Tensors are dequantized to f32 when loaded, or, for the CPU block kernels, kept as
//! blocks read in place from the mapping. Names in GGUF files are already ours
//! (`blk.N.attn_q.weight`); the one GGUF-specific transform is undoing the row
//! permutation that GGUF converters apply to Llama's Q and K projections.
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::config::{ModelConfig, RopeConfig, RopeParameters, FULL_ATTENTION, SLIDING_ATTENTION};
use crate::error::{io_err, ModelError, Result};
use crate::registry::GgufConventions;
use crate::weights::{HostTensor, TensorInfo, TensorSource};
use llama_graph::quant::{dequantize, Bytes, GgmlType};

mod meta;

use meta::Cursor;
pub use meta::{MetaValue, NumArray, StrArray};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;
/// One tensor's entry in the file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// Row-major shape, outermost first (GGUF stores the innermost dimension first).
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Byte range in the file.
    pub start: usize,
    pub len: usize,
}

/// The mapped file, as the store that block matrices read their rows from.
struct Mapped(Mmap);

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Bytes for Mapped {
    fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn release(&self, range: std::ops::Range<usize>) {
        // SAFETY: the map is read-only and shared with the file, so dropped pages hold
        // nothing of ours: a later read faults them in again from the file. A failed
        // hint changes nothing.
        let _ = unsafe {
            self.0.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.len(),
            )
        };
    }
}

/// An open GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensor>,
    /// Tensor name to its index in `tensors`.
    index: std::collections::HashMap<String, usize>,
    map: Arc<Mapped>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// True when `path` starts with the GGUF magic.
    pub fn sniff(path: &Path) -> bool {
        use std::io::Read;
        let mut magic = [0u8; 4];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map(|_| &magic == MAGIC)
            .unwrap_or(false)
    }

    /// Opens and validates a GGUF file: header, metadata, and every tensor's extent.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: read-only map; see `SafetensorsSource::open_files`.
        let map = Arc::new(Mapped(unsafe { Mmap::map(&file) }.map_err(io_err(path))?));
        let store: Arc<dyn Bytes> = map.clone();
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path,
            store: Some(&store),
        };
        if c.take(4, "the magic")? != MAGIC {
            return Err(ModelError::Gguf {
                path: path.to_path_buf(),
                message: "not a GGUF file (bad magic)".into(),
            });
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::Gguf {
                path: path.to_path_buf(),
                message: format!("GGUF version {version} is not supported (2, 3)"),
            });
        }
        // Each tensor info and key-value pair takes at least 8 bytes.
        let n_tensors = c.len("the tensor count", 8)?;
        let n_kv = c.len("the metadata count", 8)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let ty = c.u32("a metadata type")?;
            let value = c.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let n_dims = c.u32("a tensor rank")? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.err(&format!("tensor `{name}` has rank {n_dims}")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64("a tensor dimension")? as usize);
            }
            let ty_id = c.u32("a tensor type")?;
            let offset = c.u64("a tensor offset")? as usize;
            infos.push((name, dims, ty_id, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
            .map(|a| a as usize)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(c.err(&format!(
                "general.alignment {alignment} is not a power of two"
            )));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty_id, offset) in infos {
            let bad = |message: String| ModelError::Gguf {
                path: path.to_path_buf(),
                message,
            };
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has ggml type {ty_id}, which is not supported"
                ))
            })?;
            let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let len = n.and_then(|n| ty.bytes_for(n)).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` of shape {dims:?} is not a whole number of {} blocks",
                    ty.name()
                ))
            })?;
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= map.len() => tensors.push(GgufTensor {
                    name,
                    shape: dims.iter().rev().copied().collect(),
                    ty,
                    start,
                    len,
                }),
                _ => {
                    return Err(bad(format!(
                        "tensor `{name}` ({len} bytes at offset {offset}) lies past the end of the file ({} bytes)",
                        map.len()
                    )))
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            index: tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Drops the file's pages from this process's memory once the weights are loaded:
    /// what was copied (f32 norms) is not read again, and block matrices that are read
    /// in place fault their pages back in as they are used.
    pub fn release_pages(&self) {
        Bytes::release(&*self.map, 0..self.map.len());
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor.
    pub fn bytes(&self, t: &GgufTensor) -> &[u8] {
        &self.map[t.start..t.start + t.len]
    }

    /// A block-quantized matrix read in place from the mapped file (no copy), in the
    /// file's row order; `None` for other types and ranks.
    pub fn blocks(&self, t: &GgufTensor) -> Option<llama_graph::quant::QMatrix> {
        let [rows, cols] = t.shape.as_slice() else {
            return None;
        };
        llama_graph::quant::QMatrix::new(t.ty, *rows, *cols, self.map.clone(), t.start).ok()
    }

    /// A tensor dequantized to f32, in the file's row order.
    pub fn dequantize(&self, t: &GgufTensor) -> Vec<f32> {
        let mut out = Vec::with_capacity(t.shape.iter().product());
        dequantize(t.ty, self.bytes(t), &mut out);
        out
    }

    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| self.missing("general.architecture"))
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            message: format!("metadata `{key}` is missing or of the wrong type"),
        }
    }

    /// `{arch}.{key}` read by `read`: `None` when absent, an error when of another type.
    fn arch_value<T>(
        &self,
        key: &str,
        read: impl Fn(&MetaValue) -> Option<T>,
    ) -> Result<Option<T>> {
        let full = format!("{}.{key}", self.architecture()?);
        match self.get(&full) {
            None => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| self.missing(&full)),
        }
    }

    fn arch_u64(&self, key: &str) -> Result<Option<usize>> {
        self.arch_value(key, |v| v.as_u64().map(|v| v as usize))
    }

    fn arch_f32(&self, key: &str) -> Result<Option<f32>> {
        self.arch_value(key, |v| v.as_f64().map(|v| v as f32))
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.arch_u64(key)?
            .ok_or_else(|| self.missing(&format!("{}.{key}", self.architecture().unwrap_or("?"))))
    }

    /// The model config from `{arch}.*` metadata, in HF terms.
    pub fn config(&self, hf_arch: &str, conventions: &GgufConventions) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let heads = self.required("attention.head_count")?;
        let hidden = self.required("embedding_length")?;
        let vocab = match self.arch_u64("vocab_size")? {
            Some(v) => v,
            None => self
                .get("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_strings)
                .map(StrArray::len)
                .or_else(|| self.tensor("token_embd.weight").map(|t| t.shape[0]))
                .ok_or_else(|| self.missing(&format!("{arch}.vocab_size")))?,
        };
        let head_dim = self
            .arch_u64("attention.key_length")?
            .unwrap_or(hidden / heads.max(1));
        if let Some(rot) = self.arch_u64("rope.dimension_count")? {
            if rot != head_dim {
                return Err(ModelError::Gguf {
                    path: self.path.clone(),
                    message: format!(
                        "partial rotary embeddings ({rot} of {head_dim} dims) are not supported"
                    ),
                });
            }
        }
        let rope_scaling = match self
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(MetaValue::as_str)
        {
            None | Some("none") => None,
            Some("linear") => Some(crate::config::RopeParameters {
                rope_type: Some("linear".into()),
                factor: self.arch_f32("rope.scaling.factor")?,
                ..Default::default()
            }),
            Some(other) => {
                return Err(ModelError::Gguf {
                    path: self.path.clone(),
                    message: format!("rope scaling `{other}` is not supported"),
                })
            }
        };
        let token = |k: &str| self.get(k).and_then(MetaValue::as_u64).map(|v| v as u32);
        let layers = self.required("block_count")?;
        let rope_theta = self.arch_f32("rope.freq_base")?.unwrap_or(10_000.0);
        // Interleaved local and global layers: which is which, and each kind's RoPE.
        let (layer_types, rope_parameters) = match conventions.local_layers {
            None => (None, None),
            Some(local) => {
                let every = match self.arch_u64("attention.sliding_window_pattern")? {
                    Some(p) if p > 0 => p,
                    _ => local.global_every,
                };
                let types = (0..layers)
                    .map(|l| {
                        if (l + 1).is_multiple_of(every) {
                            FULL_ATTENTION
                        } else {
                            SLIDING_ATTENTION
                        }
                        .to_string()
                    })
                    .collect();
                let global = RopeParameters {
                    rope_theta: Some(rope_theta),
                    ..rope_scaling.clone().unwrap_or_default()
                };
                let local_rope = RopeParameters {
                    rope_theta: Some(local.local_rope_base),
                    ..RopeParameters::default()
                };
                let per_type = [
                    (FULL_ATTENTION.to_string(), global),
                    (SLIDING_ATTENTION.to_string(), local_rope),
                ];
                (
                    Some(types),
                    Some(RopeConfig::PerLayerType(per_type.into_iter().collect())),
                )
            }
        };
        // Attention scores scale by `attention.scale` where the file states one (llama.cpp's
        // key); otherwise by `1 / sqrt(head_dim)`, except Gemma 3 27B (62 layers), whose
        // `query_pre_attn_scalar` is `d_model / heads`, as llama.cpp knows by its size.
        let query_pre_attn_scalar = match self.arch_f32("attention.scale")? {
            Some(scale) if scale > 0.0 => Some(1.0 / (scale * scale)),
            Some(scale) => {
                return Err(ModelError::Gguf {
                    path: self.path.clone(),
                    message: format!("{arch}.attention.scale {scale} is not positive"),
                })
            }
            None => {
                (conventions.name == "gemma3" && layers == 62).then(|| hidden as f32 / heads as f32)
            }
        };
        let config = ModelConfig {
            architectures: vec![hf_arch.to_string()],
            model_type: Some(arch.to_string()),
            hidden_size: hidden,
            intermediate_size: self.required("feed_forward_length")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: self.arch_u64("attention.head_count_kv")?,
            head_dim: Some(head_dim),
            vocab_size: vocab,
            rms_norm_eps: self
                .arch_f32("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            rope_theta: Some(rope_theta),
            rope_scaling,
            rope_parameters,
            rope_local_base_freq: None,
            max_position_embeddings: self.arch_u64("context_length")?.unwrap_or(2048),
            // GGUF files leave out the output head when it is tied to the embeddings.
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            bos_token_id: token("tokenizer.ggml.bos_token_id"),
            eos_token_id: token("tokenizer.ggml.eos_token_id").map(crate::config::TokenIds::One),
            hidden_act: Some(conventions.activation.to_string()),
            hidden_activation: None,
            sliding_window: self.arch_u64("attention.sliding_window")?,
            use_sliding_window: None,
            layer_types,
            sliding_window_pattern: None,
            query_pre_attn_scalar,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            use_bidirectional_attention: None,
            attention_bias: false,
            mlp_bias: false,
            layer_norm_eps: None,
            type_vocab_size: None,
            position_embedding_type: None,
        };
        config.validate(&self.path)?;
        Ok(config)
    }
}

/// GGUF tensors as a [`TensorSource`], in HF conventions: Q/K rows back in HF order,
/// norm weights without the `1 +` some converters fold in.
pub struct GgufSource<'a> {
    pub file: &'a GgufFile,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub conventions: GgufConventions,
}

impl<'a> GgufSource<'a> {
    pub fn new(file: &'a GgufFile, config: &ModelConfig, conventions: GgufConventions) -> Self {
        GgufSource {
            file,
            n_heads: config.num_attention_heads,
            n_kv_heads: config.n_kv_heads(),
            conventions,
        }
    }
}

impl TensorSource for GgufSource<'_> {
    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.file.tensors.iter().map(|t| t.name.clone()).collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file.tensor(name).map(|t| t.shape.clone())
    }

    fn inventory(&self) -> Vec<TensorInfo> {
        self.file
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                dtype: t.ty.name().to_string(),
                shape: t.shape.clone(),
                bytes: t.len,
            })
            .collect()
    }

    fn load(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(t) = self.file.tensor(name) else {
            return Ok(None);
        };
        let mut data = self.file.dequantize(t);
        if self.conventions.norm_plus_one && name.ends_with("norm.weight") {
            data.iter_mut().for_each(|x| *x -= 1.0);
        }
        if let Some(order) = self.row_order(name, &t.shape)? {
            let cols = t.shape[1];
            let mut rows = Vec::with_capacity(data.len());
            for src in order {
                rows.extend_from_slice(&data[src * cols..(src + 1) * cols]);
            }
            data = rows;
        }
        Ok(Some(HostTensor {
            shape: t.shape.clone(),
            data,
        }))
    }

    fn load_blocks(&self, name: &str) -> Result<Option<llama_graph::quant::QMatrix>> {
        let Some(t) = self.file.tensor(name) else {
            return Ok(None);
        };
        let Some(m) = self.file.blocks(t) else {
            return Ok(None);
        };
        match self.row_order(name, &t.shape)? {
            // Q/K rows reordered by reference: the blocks stay in the mapped file.
            Some(order) => Ok(m.select_rows(&order)),
            None => Ok(Some(m)),
        }
    }
}

impl GgufSource<'_> {
    /// For Q/K weights stored permuted: which file row each of our rows comes from.
    fn row_order(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<usize>>> {
        let heads = if !self.conventions.permuted_qk {
            None
        } else if name.ends_with(".attn_q.weight") {
            Some(self.n_heads)
        } else if name.ends_with(".attn_k.weight") {
            Some(self.n_kv_heads)
        } else {
            None
        };
        let (Some(heads), [rows, _]) = (heads, shape) else {
            return Ok(None);
        };
        unpermute_order(heads, *rows)
            .map(Some)
            .ok_or_else(|| ModelError::Gguf {
                path: self.file.path.clone(),
                message: format!(
                    "`{name}` has {rows} rows, not a whole number of {heads} heads with even size"
                ),
            })
    }
}

/// GGUF converters reorder each head's Q/K rows so that RoPE rotates adjacent pairs;
/// HF's (and our) RoPE rotates the two halves of a head. Within head `h` of size `d`,
/// file row `2i + j` holds HF row `j * d/2 + i`; this returns, for each HF row, its file
/// row.
fn unpermute_order(heads: usize, rows: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let d = rows / heads;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                order[h * d + j * (d / 2) + i] = h * d + 2 * i + j;
            }
        }
    }
    Some(order)
}
