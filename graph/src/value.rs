//! Runtime values of graph nodes: burn tensors of the ranks the IR uses.
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{GraphError, Result};
use crate::ir::DType;

/// The value of one node on some burn device.
#[derive(Debug, Clone)]
pub enum Value {
    F1(Tensor<1>),
    F2(Tensor<2>),
    I1(Tensor<1, Int>),
    /// A weight matrix of GGML blocks in host memory, for the CPU matmul kernels.
    Quant(std::sync::Arc<llama_kernels::quant::QMatrix>),
    /// A weight matrix of GGML blocks on a GPU device, for the GPU block kernels.
    Blocks(std::sync::Arc<crate::gpu::DeviceBlocks>),
    /// Keys or values held in the host KV cache (CPU devices), read in place.
    Cached(crate::exec::CachedRows),
    /// One value per sequence of a batched step, in row order: what `kv_append`
    /// yields when a step carries several sequences (each its own cache's rows).
    PerSequence(Vec<Value>),
}

impl Value {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Value::F1(t) => t.dims().to_vec(),
            Value::F2(t) => t.dims().to_vec(),
            Value::I1(t) => t.dims().to_vec(),
            Value::Quant(m) => vec![m.rows(), m.cols()],
            Value::Blocks(m) => vec![m.rows(), m.cols()],
            Value::Cached(r) => vec![r.rows, r.width],
            Value::PerSequence(values) => {
                let dims: Vec<Vec<usize>> = values.iter().map(Value::dims).collect();
                match dims.first() {
                    Some(first) if first.len() == 2 => {
                        vec![dims.iter().map(|d| d[0]).sum(), first[1]]
                    }
                    _ => Vec::new(),
                }
            }
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Value::I1(_) => DType::I64,
            _ => DType::F32,
        }
    }

    /// Copies a float value to the host, row-major.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        // The clone shares the tensor's buffer, so reading it out copies it.
        self.clone().into_f32_vec()
    }

    /// A float value's data on the host, row-major: without a copy where the tensor's
    /// buffer is contiguous and not shared (burn-flex hands it over).
    pub fn into_f32_vec(self) -> Result<Vec<f32>> {
        let data: TensorData = match self {
            Value::F1(t) => t.into_data(),
            Value::F2(t) => t.into_data(),
            Value::I1(_) => return Err(GraphError::Input("integer value read as f32".into())),
            Value::Quant(m) => return Ok(m.dequantize()),
            Value::Blocks(m) => return Ok(m.host().dequantize()),
            Value::Cached(_) | Value::PerSequence(_) => {
                return Err(GraphError::Input(
                    "cached KV rows are read through the cache".into(),
                ))
            }
        };
        data.convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| GraphError::Input(format!("reading tensor data: {e:?}")))
    }

    /// The argmax of a `[rows, n]` value's last row (the first on ties), and the row's
    /// sum (not finite when any value is not): computed where the value lives, so a
    /// device hands back two numbers instead of the row.
    pub fn last_row_argmax(self) -> Result<(u32, f32)> {
        let Value::F2(t) = self else {
            return Err(GraphError::Input(
                "argmax of a value that is not a matrix".into(),
            ));
        };
        let [rows, n] = t.dims();
        if rows == 0 || n == 0 {
            return Err(GraphError::Input("argmax of an empty matrix".into()));
        }
        let last = t.narrow(0, rows - 1, 1);
        // The index as f32 is exact below 2^24, far above any vocabulary.
        let id = last.clone().argmax(1).float();
        let sum = last.sum().reshape([1, 1]);
        let both = Value::F2(Tensor::cat(vec![id, sum], 1)).into_f32_vec()?;
        match both[..] {
            [id, sum] => Ok((id as u32, sum)),
            _ => Err(GraphError::Input("argmax read back the wrong shape".into())),
        }
    }

    /// Copies an integer value to the host.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        let Value::I1(t) = self else {
            return Err(GraphError::Input("float value read as integers".into()));
        };
        t.to_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| GraphError::Input(format!("reading tensor data: {e:?}")))
    }

    /// A float value from host data of the given shape (rank 1 or 2).
    pub fn from_f32(
        values: Vec<f32>,
        dims: &[usize],
        device: &burn::tensor::Device,
    ) -> Result<Value> {
        let n: usize = dims.iter().product();
        if n != values.len() {
            return Err(GraphError::Input(format!(
                "{} values do not fill shape {dims:?}",
                values.len()
            )));
        }
        let data = TensorData::new(values, dims.to_vec());
        match dims.len() {
            1 => Ok(Value::F1(Tensor::from_data(data, device))),
            2 => Ok(Value::F2(Tensor::from_data(data, device))),
            r => Err(GraphError::Input(format!(
                "rank {r} values are not supported"
            ))),
        }
    }
}
