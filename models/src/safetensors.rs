//! Memory-mapped safetensors checkpoints, single file or sharded, validated up front.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use crate::error::{io_err, ModelError, Result};
use crate::weights::{ours_to_hf_all, HostTensor, TensorInfo, TensorSource};

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// All tensors of a checkpoint, by checkpoint name.
pub struct SafetensorsSource {
    shards: Vec<Shard>,
    /// Checkpoint name to shard index.
    names: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.clone(),
                source,
            })?;
            let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
            files.sort();
            files.dedup();
            files
        } else {
            return Err(ModelError::NotAModel(dir.to_path_buf()));
        };
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut names = HashMap::new();
        for path in files {
            let file = File::open(path).map_err(io_err(path))?;
            // SAFETY: the map is read-only; a checkpoint changed on disk while we run is
            // outside what any memory-mapping loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
            // Checks the header length, the JSON, every tensor's extent and that the
            // offsets cover the file exactly, so no later read can go out of bounds.
            let (header_len, metadata) =
                SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            for name in metadata.tensors().keys() {
                names.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                path: path.clone(),
                map,
                header_len,
                metadata,
            });
        }
        Ok(SafetensorsSource { shards, names })
    }
}

impl TensorSource for SafetensorsSource {
    fn describe(&self) -> String {
        match self.shards.as_slice() {
            [one] => one.path.display().to_string(),
            many => format!("{} safetensors shards", many.len()),
        }
    }

    fn describe_tensor(&self, name: &str) -> String {
        match self.names.get(name) {
            Some(&s) => self.shards[s].path.display().to_string(),
            None => self.describe(),
        }
    }

    fn checkpoint_name(&self, ours: &str) -> String {
        let hf = ours_to_hf_all(ours);
        if hf.is_empty() {
            ours.to_string()
        } else {
            hf.join(" or ")
        }
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.names.keys().cloned().collect();
        v.sort();
        v
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.names.get(name)?];
        shard.metadata.info(name).map(|i| i.shape.clone())
    }

    fn inventory(&self) -> Vec<TensorInfo> {
        let mut v: Vec<TensorInfo> = self
            .shards
            .iter()
            .flat_map(|shard| {
                shard
                    .metadata
                    .tensors()
                    .into_iter()
                    .map(|(name, info)| TensorInfo {
                        name,
                        dtype: format!("{:?}", info.dtype),
                        shape: info.shape.clone(),
                        bytes: info.data_offsets.1 - info.data_offsets.0,
                    })
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn load(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(&s) = self.names.get(name) else {
            return Ok(None);
        };
        let shard = &self.shards[s];
        let Some(info) = shard.metadata.info(name) else {
            return Ok(None);
        };
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let bytes = shard
            .map
            .get(start..end)
            .ok_or_else(|| ModelError::Safetensors {
                path: shard.path.clone(),
                message: format!("tensor `{name}` lies outside the file"),
            })?;
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::TensorDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(Some(HostTensor {
            shape: info.shape.clone(),
            data,
        }))
    }
}
