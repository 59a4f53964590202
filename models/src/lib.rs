//! llama-models: configs, weight loading and one graph-building file per family.
pub mod bert;
pub mod config;
pub mod convert;
pub mod error;
pub mod gemma;
pub mod gemma3;
pub mod gguf;
pub mod layers;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod registry;
pub mod safetensors;
pub mod weights;

/// GGML block types and their dequantization (they live with the host kernels).
pub use llama_kernels::quant;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use llama_graph::Graph;

pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use gguf::GgufFile;
pub use registry::{Family, FamilyWeights, GgufConventions, LocalLayers};

/// Where a model was loaded from.
#[derive(Debug)]
pub enum ModelSource {
    /// An HF directory: config.json, safetensors, tokenizer.json.
    HfDir(PathBuf),
    /// A GGUF file, kept open for its tokenizer and chat template metadata.
    Gguf(Box<gguf::GgufFile>),
}

impl ModelSource {
    /// Opens what `path` names, without loading weights: an HF directory or a GGUF file.
    pub fn open(path: &Path) -> Result<ModelSource> {
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        if path.is_dir() {
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        if !gguf::GgufFile::sniff(path) {
            return Err(ModelError::NotAModel(path.to_path_buf()));
        }
        Ok(ModelSource::Gguf(Box::new(gguf::GgufFile::open(path)?)))
    }

    /// The family, the config, and the checkpoint as a tensor source, without reading
    /// any tensor; `f` gets them.
    fn with_checkpoint<T>(
        &self,
        f: impl FnOnce(Family, ModelConfig, &dyn weights::TensorSource) -> Result<T>,
    ) -> Result<T> {
        match self {
            ModelSource::HfDir(dir) => {
                let config = ModelConfig::from_file(&dir.join("config.json"))?;
                let family = Family::from_config(&config)?;
                let source = safetensors::SafetensorsSource::open_dir(dir)?;
                f(family, config, &source)
            }
            ModelSource::Gguf(file) => {
                let family = Family::from_gguf(file.architecture()?)?;
                let conventions = family
                    .gguf_conventions()
                    .ok_or_else(|| ModelError::NotAModel(file.path.clone()))?;
                let config = file.config(family.hf_name(), &conventions)?;
                let source = gguf::GgufSource::new(file, &config, conventions);
                f(family, config, &source)
            }
        }
    }

    /// The family, config and every stored tensor, without loading weights.
    pub fn inventory(&self) -> Result<Inventory> {
        self.with_checkpoint(|family, config, source| {
            Ok(Inventory {
                arch: family,
                tensors: source.inventory(),
                config,
            })
        })
    }
}

/// What a model file holds, read without loading weights.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// The family; prints as its HF name (`LlamaForCausalLM`), [`Family::hf_name`].
    pub arch: Family,
    pub config: ModelConfig,
    pub tensors: Vec<weights::TensorInfo>,
}

/// How [`Model::load_with`] loads weights.
#[derive(Default)]
pub struct LoadOptions<'a> {
    /// Keep matrices stored as GGML blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) in
    /// those blocks, read in place from the memory-mapped file, for the CPU block
    /// kernels.
    /// Otherwise every weight is widened to f32 on the device.
    pub keep_blocks: bool,
    /// Called with (tensors loaded, tensors in the checkpoint) after each tensor.
    pub progress: Option<&'a dyn Fn(usize, usize)>,
    /// Check every value of every tensor for NaN and infinity, and refuse the model
    /// naming the first such tensor (block weights are dequantized row by row for it).
    pub check_tensors: bool,
}

/// A loaded model: its config, its family's weights and where it came from.
#[derive(Debug)]
pub struct Model {
    pub path: PathBuf,
    pub source: ModelSource,
    /// Its family; prints as its HF name (`LlamaForCausalLM`), [`Family::hf_name`].
    pub arch: Family,
    pub config: ModelConfig,
    pub weights: FamilyWeights,
}

impl Model {
    /// Loads an HF model directory or a `.gguf` file onto `device`, every weight as
    /// an f32 tensor.
    pub fn load(path: &Path, device: &Device) -> Result<Model> {
        Self::load_with(path, device, &LoadOptions::default())
    }

    /// Loads with `options`: GGUF block matrices kept as stored, progress reports.
    pub fn load_with(path: &Path, device: &Device, options: &LoadOptions) -> Result<Model> {
        let source = ModelSource::open(path)?;
        let (arch, config, weights) = source.with_checkpoint(|family, config, checkpoint| {
            let mut loader = weights::WeightLoader::new(checkpoint, device, family)
                .keep_blocks(options.keep_blocks)
                .check_tensors(options.check_tensors);
            if let Some(progress) = options.progress {
                loader = loader.with_progress(progress);
            }
            let weights = family.load(&config, &loader)?;
            Ok((family, config, weights))
        })?;
        if let ModelSource::Gguf(file) = &source {
            file.release_pages();
        }
        Ok(Model {
            path: path.to_path_buf(),
            source,
            arch,
            config,
            weights,
        })
    }

    /// The forward graph, with RoPE tables for the model's whole context.
    pub fn build_graph(&self) -> Result<Graph> {
        self.build_graph_for(self.config.max_position_embeddings)
    }

    /// The forward graph for sessions of up to `positions` positions: its RoPE tables
    /// hold that many rows (a 128k-position model's tables are 64 MiB in full).
    pub fn build_graph_for(&self, positions: usize) -> Result<Graph> {
        self.weights.build(&self.config, positions)
    }

    /// The model's own `tokenizer.json`, if it has one.
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        match &self.source {
            ModelSource::HfDir(dir) => Some(dir.join("tokenizer.json")).filter(|p| p.exists()),
            ModelSource::Gguf(_) => None,
        }
    }

    /// End-of-generation ids: every id that `generation_config.json` and config.json
    /// name (each may be a list); for GGUF, the end-of-sequence, end-of-turn and
    /// end-of-message ids.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        match &self.source {
            ModelSource::HfDir(dir) => {
                if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
                    #[derive(serde::Deserialize)]
                    struct Gen {
                        eos_token_id: Option<config::TokenIds>,
                    }
                    if let Ok(Gen {
                        eos_token_id: Some(e),
                    }) = serde_json::from_str::<Gen>(&text)
                    {
                        ids.extend(e.to_vec());
                    }
                }
                ids.extend(self.config.eos_token_ids());
            }
            ModelSource::Gguf(file) => {
                for key in ["eos", "eot", "eom"] {
                    if let Some(id) = file
                        .get(&format!("tokenizer.ggml.{key}_token_id"))
                        .and_then(gguf::MetaValue::as_u64)
                    {
                        ids.push(id as u32);
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        ids
    }
}
