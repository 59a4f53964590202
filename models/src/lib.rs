//! llama-models: configs, weight loading and one graph-building file per family.
pub mod config;
pub mod error;
pub mod layers;
pub mod llama;
pub mod registry;
pub mod safetensors;
pub mod weights;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use llama_graph::Graph;

pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use registry::{Architecture, REGISTRY};

/// A loaded model: its config, its family's weights and where it came from.
#[derive(Debug)]
pub struct Model {
    pub path: PathBuf,
    /// The registry name of its family (`LlamaForCausalLM`).
    pub arch: &'static str,
    pub config: ModelConfig,
    pub weights: Box<dyn Architecture>,
}

impl Model {
    /// Loads an HF model directory (config.json and safetensors) onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Model> {
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        if !path.is_dir() {
            return Err(ModelError::NotAModel(path.to_path_buf()));
        }
        let config = ModelConfig::from_file(&path.join("config.json"))?;
        let (arch, load) = registry::lookup(&config)?;
        let source = safetensors::SafetensorsSource::open_dir(path)?;
        let loader = weights::WeightLoader::new(&source, device);
        let weights = load(&config, &loader)?;
        Ok(Model {
            path: path.to_path_buf(),
            arch,
            config,
            weights,
        })
    }

    /// The forward graph, with RoPE tables for the model's whole context.
    pub fn build_graph(&self) -> Result<Graph> {
        self.weights
            .build(&self.config, self.config.max_position_embeddings)
    }

    /// The model's own `tokenizer.json`, if it has one.
    pub fn tokenizer_path(&self) -> Option<PathBuf> {
        let p = self.path.join("tokenizer.json");
        p.exists().then_some(p)
    }

    /// End-of-generation ids: `generation_config.json` first, then `config.json`.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let gen = self.path.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen) {
            #[derive(serde::Deserialize)]
            struct Gen {
                eos_token_id: Option<config::TokenIds>,
            }
            if let Ok(Gen {
                eos_token_id: Some(ids),
            }) = serde_json::from_str::<Gen>(&text)
            {
                return ids.to_vec();
            }
        }
        self.config.eos_token_ids()
    }
}
