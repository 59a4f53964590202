//! BERT encoders (`BertModel`; all-MiniLM-L6-v2 and other sentence-transformers
//! models): learned absolute positions, token-type embeddings, post-norm blocks with
//! LayerNorm, exact GELU, and bidirectional attention. The graph's output is the last
//! hidden state `[tokens, d_model]`; pooling it into one vector per text is the
//! runtime's (see `llama_runtime::embed`).
use burn::module::{Module, Param};
use burn::tensor::Tensor;
use llama_graph::{F32Bits, Graph, NodeId, Op};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::GraphBuilder;
use crate::weights::{Matrix, WeightLoader};

/// A LayerNorm's weight and bias, `[d]` each.
#[derive(Module, Debug)]
pub struct LayerNormWeights {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
}

/// A projection `[out, in]` and its bias `[out]`.
#[derive(Module, Debug)]
pub struct Dense {
    pub weight: Matrix,
    pub bias: Param<Tensor<1>>,
}

/// One post-norm encoder layer.
#[derive(Module, Debug)]
pub struct BertLayer {
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    /// Attention output projection, then `LayerNorm(x + attn)`.
    pub attn_output: Dense,
    pub attn_norm: LayerNormWeights,
    /// `[ffn, d]`
    pub intermediate: Dense,
    /// `[d, ffn]`, then `LayerNorm(x + ffn)`.
    pub output: Dense,
    pub output_norm: LayerNormWeights,
}

/// The whole encoder's weights.
#[derive(Module, Debug)]
pub struct Bert {
    /// `[vocab, d]`
    pub word_embeddings: Matrix,
    /// `[max_positions, d]`
    pub position_embeddings: Matrix,
    /// Row 0 of `token_type_embeddings`, `[d]`: every text is embedded as segment 0
    /// (one text per input, as sentence-transformers feeds them).
    pub token_type: Param<Tensor<1>>,
    pub embeddings_norm: LayerNormWeights,
    pub layers: Vec<BertLayer>,
}

/// `BertModel` checkpoints name tensors from `embeddings.` / `encoder.`; those saved
/// from a task model (`BertForMaskedLM`, ...) put `bert.` before them.
fn prefix(w: &WeightLoader) -> &'static str {
    if w.contains("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    }
}

fn eps(c: &ModelConfig) -> f32 {
    c.layer_norm_eps.unwrap_or(1e-12)
}

/// Loads a BERT encoder, checking each shape against `c`.
pub fn load(c: &ModelConfig, w: &WeightLoader) -> Result<Bert> {
    let bad = |message: String| ModelError::Config {
        path: "config.json".into(),
        message,
    };
    match c.hidden_act.as_deref() {
        None | Some("gelu") => {}
        Some(other) => {
            return Err(bad(format!(
                "BERT activation `{other}` is not supported (gelu)"
            )))
        }
    }
    if let Some(kind) = c
        .position_embedding_type
        .as_deref()
        .filter(|k| *k != "absolute")
    {
        return Err(bad(format!(
            "position_embedding_type `{kind}` is not supported (absolute)"
        )));
    }
    if c.n_kv_heads() != c.num_attention_heads {
        return Err(bad(
            "BERT attention has as many key/value heads as query heads".into(),
        ));
    }
    let p = prefix(w);
    let d = c.hidden_size;
    let norm = |name: &str| -> Result<LayerNormWeights> {
        Ok(LayerNormWeights {
            weight: w.vector(&format!("{p}{name}.weight"), d)?,
            bias: w.vector(&format!("{p}{name}.bias"), d)?,
        })
    };
    let dense = |name: &str, d_in: usize, d_out: usize| -> Result<Dense> {
        Ok(Dense {
            weight: w.linear(&format!("{p}{name}.weight"), d_in, d_out)?,
            bias: w.vector(&format!("{p}{name}.bias"), d_out)?,
        })
    };
    let types = c.type_vocab_size.unwrap_or(2).max(1);
    let token_types = w.table(
        &format!("{p}embeddings.token_type_embeddings.weight"),
        types,
        d,
    )?;
    let token_type = match token_types.value() {
        llama_graph::Value::F2(t) => Param::from_tensor(t.narrow(0, 0, 1).reshape([d])),
        _ => return Err(bad("token_type_embeddings must be a dense table".into())),
    };
    // The task heads of a pretraining checkpoint and the pooler (a dense layer over the
    // [CLS] row that sentence embeddings do not use) stay unread, as transformers'
    // `BertModel(add_pooling_layer=False)` leaves them.
    for name in ["pooler.dense.weight", "pooler.dense.bias"] {
        w.ignore(&format!("{p}{name}"));
    }
    let ffn = c.intermediate_size;
    let layers = (0..c.num_hidden_layers)
        .map(|l| {
            let at = |what: &str| format!("encoder.layer.{l}.{what}");
            Ok(BertLayer {
                query: dense(&at("attention.self.query"), d, d)?,
                key: dense(&at("attention.self.key"), d, d)?,
                value: dense(&at("attention.self.value"), d, d)?,
                attn_output: dense(&at("attention.output.dense"), d, d)?,
                attn_norm: norm(&at("attention.output.LayerNorm"))?,
                intermediate: dense(&at("intermediate.dense"), d, ffn)?,
                output: dense(&at("output.dense"), ffn, d)?,
                output_norm: norm(&at("output.LayerNorm"))?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Bert {
        word_embeddings: w.table(
            &format!("{p}embeddings.word_embeddings.weight"),
            c.vocab_size,
            d,
        )?,
        position_embeddings: w.table(
            &format!("{p}embeddings.position_embeddings.weight"),
            c.max_position_embeddings,
            d,
        )?,
        token_type,
        embeddings_norm: norm("embeddings.LayerNorm")?,
        layers,
    })
}

impl Bert {
    /// The encoder, top to bottom: embeddings (word + position + segment 0, then
    /// LayerNorm), then each layer's `LayerNorm(x + attn(x))` and
    /// `LayerNorm(x + ffn(x))`. The output is the last hidden state `[tokens, d]`.
    pub fn build(&self, c: &ModelConfig) -> Result<Graph> {
        let mut b = GraphBuilder::new();
        let eps = eps(c);
        let tokens = b.tokens()?; // [seq]
        let words = b.weight2("token_embd.weight", &self.word_embeddings)?;
        let x = b.embedding(words, tokens)?; // [seq, d]
        let positions = b.weight2("position_embd.weight", &self.position_embeddings)?;
        let pos = b.op("inp_pos", Op::PositionEmbedding, &[positions])?;
        let x = b.add("inp_embd_pos", x, pos)?;
        let segment = b.weight1("token_type_embd.weight", &self.token_type)?;
        let x = b.add("inp_embd_type", x, segment)?;
        let mut x = layer_norm(&mut b, "inp_norm", x, &self.embeddings_norm, eps)?;
        let (heads, head_dim) = (c.num_attention_heads, c.head_dim());
        for (l, w) in self.layers.iter().enumerate() {
            let blk = |what: &str| crate::layers::blk(l, what);
            let q = dense(&mut b, &blk("attn_q"), x, &w.query)?;
            let k = dense(&mut b, &blk("attn_k"), x, &w.key)?;
            let v = dense(&mut b, &blk("attn_v"), x, &w.value)?;
            let attn = Op::EncoderAttention {
                n_heads: heads,
                head_dim,
                scale: F32Bits::new(1.0 / (head_dim as f32).sqrt()),
            };
            let h = b.op(&blk("attn_out"), attn, &[q, k, v])?;
            let h = dense(&mut b, &blk("attn_output"), h, &w.attn_output)?;
            let h = b.add(&blk("attn_residual"), x, h)?;
            let x1 = layer_norm(&mut b, &blk("attn_norm"), h, &w.attn_norm, eps)?;
            let h = dense(&mut b, &blk("ffn_up"), x1, &w.intermediate)?; // [seq, ffn]
            let h = b.op(&blk("ffn_gelu"), Op::Gelu, &[h])?;
            let h = dense(&mut b, &blk("ffn_down"), h, &w.output)?; // [seq, d]
            let h = b.add(&blk("ffn_residual"), x1, h)?;
            x = layer_norm(&mut b, &blk("layer_out"), h, &w.output_norm, eps)?;
        }
        Ok(b.finish(vec![x]))
    }
}

/// `x @ w^T + b`, the weights named `{name}.weight` / `{name}.bias`.
fn dense(b: &mut GraphBuilder, name: &str, x: NodeId, w: &Dense) -> Result<NodeId> {
    let weight = b.weight2(&format!("{name}.weight"), &w.weight)?;
    let bias = b.weight1(&format!("{name}.bias"), &w.bias)?;
    b.linear(name, x, weight, Some(bias))
}

fn layer_norm(
    b: &mut GraphBuilder,
    name: &str,
    x: NodeId,
    w: &LayerNormWeights,
    eps: f32,
) -> Result<NodeId> {
    let weight = b.weight1(&format!("{name}.weight"), &w.weight)?;
    let bias = b.weight1(&format!("{name}.bias"), &w.bias)?;
    b.op(
        name,
        Op::LayerNorm {
            eps: F32Bits::new(eps),
        },
        &[x, weight, bias],
    )
}
