//! The one entry point every front-end calls: load a model, compile its graph for a
//! device under one policy, open sessions.
//!
//! The CLI (and every later front-end: the server, embeddings, agents) only parses its
//! input into [`SessionOptions`], calls [`Engine::load`] and prints or answers. Which
//! passes run, whether GGUF blocks stay in their blocks and how the KV cache stores its
//! rows are decided here, by [`Policy::decide`], from the device's [`Capabilities`].
use std::path::Path;
use std::str::FromStr;

use burn::tensor::Device;
use llama_graph::{Capabilities, KvType, Op, PassContext, Pipeline, Program};
use llama_models::{LoadOptions, Model};

use crate::device::Backend;
use crate::error::{Result, RuntimeError};
use crate::{ChatTemplate, Session, Tokenizer};

/// How matmul weights are stored on devices with host kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// GGUF block weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) stay in their
    /// blocks, memory-mapped, multiplied by the block kernels; other weights run in f32.
    #[default]
    Native,
    /// As native, and f32 weights are quantized to Q8_0 as well.
    Q8_0,
    /// Every weight widened to f32: the exact path, for fidelity work.
    F32,
}

/// Which graph passes run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Passes {
    /// The device's default pipeline (see [`Policy::decide`]).
    #[default]
    Default,
    /// None: the graph as the model built it.
    None,
    /// These passes, in this order (names from [`Pipeline::NAMES`]).
    List(Vec<String>),
}

impl FromStr for Passes {
    type Err = RuntimeError;

    /// `default`, `none`, or a comma-separated list of pass names (checked).
    fn from_str(spec: &str) -> Result<Passes> {
        Ok(match spec.trim() {
            "default" => Passes::Default,
            "none" => Passes::None,
            list => {
                let names: Vec<String> = list.split(',').map(|n| n.trim().to_string()).collect();
                if let Some(bad) = names.iter().find(|n| Pipeline::by_name(n).is_none()) {
                    return Err(RuntimeError::Options(format!(
                        "unknown pass `{bad}` (passes: default, none, {})",
                        Pipeline::NAMES.join(", ")
                    )));
                }
                Passes::List(names)
            }
        })
    }
}

/// Everything a front-end chooses about how a model runs.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub backend: Backend,
    /// The backend's device index (GPU adapters); `None` picks the best.
    pub device: Option<usize>,
    /// Worker threads of the CPU backends; `None`: the physical cores. The pool is
    /// process-wide: the first engine loaded sets it.
    pub threads: Option<usize>,
    pub precision: Precision,
    /// The KV cache's element type; `None`: the device's default.
    pub cache_type: Option<KvType>,
    pub passes: Passes,
    /// Positions a session holds (the RoPE tables are built for this many).
    pub context: Context,
    /// Refuse a model whose weights hold NaN or infinity, naming the tensor
    /// (`LoadOptions::check_tensors`); off by default, as it reads every weight.
    pub check_tensors: bool,
}

/// How many positions an engine's sessions hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Context {
    /// The model's context, at most [`DEFAULT_CONTEXT`].
    #[default]
    Default,
    /// The model's whole context, however long.
    Model,
    /// This many; more than the model's context is an error.
    Positions(usize),
}

/// The context a session gets when none is asked for, if the model allows as much.
pub const DEFAULT_CONTEXT: usize = 4096;

/// What the engine compiles for a device: decided once, here.
///
/// | | host kernels (flex) | device blocks (wgpu) | neither (ndarray) |
/// |---|---|---|---|
/// | GGUF block weights | kept in blocks unless `Precision::F32` | kept in blocks on the device unless `Precision::F32` or a pass list without upload-blocks | widened to f32 |
/// | default passes | fuse-matmul, constant-fold, dead-nodes, fuse-swiglu, quantize-weights (`Precision::Q8_0` only), pack-blocks | fuse-matmul, constant-fold, dead-nodes, upload-blocks | fuse-matmul, constant-fold, dead-nodes |
/// | KV cache | host rows, f16 (f32 with `Precision::F32`; q8_0/q4_0 blocks when asked, sliding-window layers then f32) | device tensors, f16 where the device computes in f16 (f32 with `Precision::F32`) | device tensors, f32 |
pub struct Policy {
    /// Whether GGUF block matrices stay as stored.
    pub keep_blocks: bool,
    /// The pass pipeline to run.
    pub pipeline: Pipeline,
    /// The KV cache's element type (caches of devices without our kernels are f32).
    pub cache_type: KvType,
}

impl Policy {
    /// The policy for a device with `caps` under `options`.
    pub fn decide(caps: Capabilities, options: &SessionOptions) -> Policy {
        let host = caps.host_kernels;
        let pipeline = match &options.passes {
            Passes::Default if host => Pipeline::standard_cpu(options.precision == Precision::Q8_0),
            Passes::Default if caps.device_blocks => Pipeline::standard_gpu(),
            Passes::Default => Pipeline::standard(),
            Passes::None => Pipeline::none(),
            Passes::List(names) => {
                Pipeline::from_passes(names.iter().filter_map(|n| Pipeline::by_name(n)).collect())
            }
        };
        let cache_type = match options.cache_type {
            _ if !caps.host_kv && !caps.device_blocks => KvType::F32,
            Some(ty) => ty,
            None if options.precision == Precision::F32 => KvType::F32,
            None => KvType::F16,
        };
        // On GPU devices blocks stay only where the pipeline moves them to the device:
        // a pass list without `upload-blocks` gets the widened weights burn multiplies.
        let gpu_blocks = caps.device_blocks && pipeline.names().contains(&"upload-blocks");
        Policy {
            keep_blocks: (host || gpu_blocks) && options.precision != Precision::F32,
            pipeline,
            cache_type,
        }
    }
}

/// A loaded model compiled for one device: opens sessions.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    device: Device,
    capabilities: Capabilities,
    program: Program,
    context: usize,
    cache_type: KvType,
    cache_note: Option<String>,
    passes: Vec<&'static str>,
    /// The chat template `--chat-template` chose, over the file's own.
    template: Option<ChatTemplate>,
    /// The built-in template and its name, for a generating model whose file has no
    /// template (worked out once).
    fallback: std::sync::OnceLock<Option<(ChatTemplate, &'static str)>>,
}

impl Engine {
    /// Loads the model at `path` (an HF directory or a `.gguf` file) and compiles it.
    pub fn load(path: &Path, options: &SessionOptions) -> Result<Engine> {
        Self::load_with_progress(path, options, None)
    }

    /// The same, calling `progress(tensors loaded, tensors in the checkpoint)` as
    /// weights load.
    pub fn load_with_progress(
        path: &Path,
        options: &SessionOptions,
        progress: Option<&dyn Fn(usize, usize)>,
    ) -> Result<Engine> {
        // flex's matmuls and reductions and our host kernels run on rayon's global
        // pool; it can be built once per process, so a second engine shares the first's.
        let threads = options.threads.unwrap_or_else(num_cpus::get_physical);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .ok();
        let device = options.backend.device(options.device)?;
        let capabilities = Capabilities::of(&device);
        if let Some(ty) = options
            .cache_type
            .filter(|t| t.is_blocks() && !capabilities.host_kv)
        {
            return Err(RuntimeError::Options(format!(
                "--cache-type {ty} is read by the host attention of the flex backend only; use f16 or f32 on {}",
                options.backend.name()
            )));
        }
        let policy = Policy::decide(capabilities, options);
        let load = LoadOptions {
            keep_blocks: policy.keep_blocks,
            progress,
            check_tensors: options.check_tensors,
        };
        let model = Model::load_with(path, &device, &load)?;
        let context = context_for(&model, options.context)?;
        let mut graph = model.build_graph_for(context)?;
        policy.pipeline.run(
            &mut graph,
            &PassContext {
                device: device.clone(),
            },
        )?;
        // Layers with a sliding window keep their ring of device tensors (f32 on CPU
        // devices) whatever the cache type; the others take it.
        let mut windowed = std::collections::BTreeSet::new();
        let mut layers = std::collections::BTreeSet::new();
        for node in graph.nodes() {
            if let Op::KvAppend { layer, window, .. } = node.op {
                layers.insert(layer);
                if window.is_some() {
                    windowed.insert(layer);
                }
            }
        }
        let program = Program::new(graph, device.clone())?;
        let cache_note = (policy.cache_type.is_blocks() && !windowed.is_empty()).then(|| {
            format!(
                "KV cache {}: {} of {} layers have a sliding window and keep f32 keys and values (bounded by the window)",
                policy.cache_type,
                windowed.len(),
                layers.len()
            )
        });
        if policy.cache_type.is_blocks() {
            // Refuses now, naming the flag, a model whose heads are not whole blocks.
            program.new_cache_of(1, policy.cache_type)?;
        }
        Ok(Engine {
            cache_note,
            model,
            device,
            capabilities,
            program,
            context,
            cache_type: policy.cache_type,
            passes: policy.pipeline.names(),
            template: None,
            fallback: std::sync::OnceLock::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    /// The compiled graph.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The most positions a session of this engine holds.
    pub fn context(&self) -> usize {
        self.context
    }

    /// How sessions' host KV caches store keys and values.
    pub fn cache_type(&self) -> KvType {
        self.cache_type
    }

    /// A line for the log when some layers cannot take the cache type asked for
    /// (sliding-window layers keep f32 under a block cache type).
    pub fn cache_note(&self) -> Option<&str> {
        self.cache_note.as_deref()
    }

    /// The passes that ran, in order.
    pub fn passes(&self) -> &[&'static str] {
        &self.passes
    }

    /// A session of the engine's whole context.
    pub fn session(&self) -> Result<Session> {
        self.session_with_context(self.context)
    }

    /// A session of `context` positions, at most the engine's.
    pub fn session_with_context(&self, context: usize) -> Result<Session> {
        self.check_generates()?;
        if context == 0 || context > self.context {
            return Err(RuntimeError::Options(format!(
                "a session of {context} positions does not fit the engine's context of {}",
                self.context
            )));
        }
        Session::with_cache_type(self.program.clone(), context, self.cache_type)
    }

    /// An error for an encoder, whose graph yields hidden states, not logits.
    pub fn check_generates(&self) -> Result<()> {
        if self.model.arch.generates() {
            return Ok(());
        }
        Err(RuntimeError::NotGenerative {
            model: self.model.path.display().to_string(),
            arch: self.model.arch.hf_name().to_string(),
        })
    }

    /// Whether the model is an encoder (its graph's output is hidden states).
    pub fn is_encoder(&self) -> bool {
        !self.model.arch.generates()
    }

    /// The pass pipeline this engine compiled with, to compile another graph of the
    /// same model alike (the hidden-state graph of [`crate::Embedder`]).
    pub fn pipeline(&self) -> Pipeline {
        Pipeline::from_passes(
            self.passes
                .iter()
                .filter_map(|n| Pipeline::by_name(n))
                .collect(),
        )
    }

    /// The model's tokenizer (its tokenizer.json, or the GGUF's vocabulary).
    /// Checks that `draft` can propose tokens for this model: a generating model
    /// whose tokenizer maps every id to the same token as ours.
    pub fn check_draft(&self, draft: &Engine) -> Result<()> {
        draft.check_generates()?;
        let (ours, theirs) = (self.tokenizer()?, draft.tokenizer()?);
        if let Some(why) = ours.differs_from(&theirs) {
            return Err(RuntimeError::Options(format!(
                "the draft model's tokenizer differs from the model's: {why}"
            )));
        }
        Ok(())
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::for_model(&self.model)
    }

    /// Chats with `choice` (a built-in template's name or a Jinja file) instead of the
    /// file's own template.
    pub fn set_chat_template(&mut self, choice: &str) -> Result<()> {
        self.check_generates()?;
        self.template = Some(ChatTemplate::given(choice, &self.model.source)?);
        Ok(())
    }

    /// The chat template: the one [`Engine::set_chat_template`] chose, else the
    /// model's own, else the built-in template of its architecture (as
    /// [`Engine::chat_template_note`] says). An encoder has none.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        if let Some(t) = &self.template {
            return Ok(t.clone());
        }
        if let Some(t) = ChatTemplate::for_model(&self.model)? {
            return Ok(t);
        }
        match self.fallback() {
            Some((t, _)) => Ok(t.clone()),
            None => Err(RuntimeError::NoChatTemplate(
                self.model.path.display().to_string(),
            )),
        }
    }

    /// The built-in template standing in for a generating model's missing one.
    fn fallback(&self) -> Option<&(ChatTemplate, &'static str)> {
        self.fallback
            .get_or_init(|| {
                if !self.model.arch.generates()
                    || !matches!(ChatTemplate::for_model(&self.model), Ok(None))
                {
                    return None;
                }
                let tokenizer = self.tokenizer().ok()?;
                ChatTemplate::fallback(self.model.arch, &self.model.source, |t| {
                    tokenizer.id_of(t).is_some()
                })
                .ok()
            })
            .as_ref()
    }

    /// One line saying that the chat template is a built-in fallback, where it is.
    pub fn chat_template_note(&self) -> Option<String> {
        if self.template.is_some() {
            return None;
        }
        let (_, name) = self.fallback()?;
        Some(format!(
            "{} has no chat template; using the built-in `{name}` template for its architecture ({})",
            self.model.path.display(),
            self.model.arch
        ))
    }

    /// The ids that end generation (end of sequence, of turn, of message). With a
    /// built-in template, its end-of-turn token too: the file does not name it.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = self.model.eos_token_ids();
        let builtin = self.template.is_some() || self.fallback().is_some();
        if builtin {
            if let Ok(tokenizer) = self.tokenizer() {
                for t in crate::chat::END_OF_TURN {
                    if let Some(id) = tokenizer.id_of(t) {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
            }
        }
        ids
    }

    /// The grammar compiler for this model's tokenizer, logits and end ids.
    pub fn grammars(&self, tokenizer: &Tokenizer) -> Result<crate::constrain::Grammars> {
        self.check_generates()?;
        let vocab = crate::session::logits_width(&self.program)?;
        crate::constrain::Grammars::new(tokenizer, vocab, &self.eos_token_ids())
    }
}

/// The positions a session holds; never more than the model's.
fn context_for(model: &Model, requested: Context) -> Result<usize> {
    let max = model.config.max_position_embeddings;
    match requested {
        Context::Positions(n) if n == 0 || n > max => {
            Err(RuntimeError::ContextSize { requested: n, max })
        }
        Context::Positions(n) => Ok(n),
        Context::Default => Ok(max.min(DEFAULT_CONTEXT)),
        Context::Model => Ok(max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Capabilities = Capabilities {
        host_kernels: true,
        host_kv: true,
        device_blocks: false,
    };
    const DEVICE_ONLY: Capabilities = Capabilities {
        host_kernels: false,
        host_kv: false,
        device_blocks: false,
    };
    const GPU: Capabilities = Capabilities {
        host_kernels: false,
        host_kv: false,
        device_blocks: true,
    };

    fn options(precision: Precision, cache_type: Option<KvType>) -> SessionOptions {
        SessionOptions {
            precision,
            cache_type,
            ..SessionOptions::default()
        }
    }

    #[test]
    fn host_devices_keep_blocks_and_run_the_cpu_passes() {
        let p = Policy::decide(HOST, &options(Precision::Native, None));
        assert!(p.keep_blocks);
        assert_eq!(p.cache_type, KvType::F16);
        assert_eq!(
            p.pipeline.names(),
            [
                "fuse-matmul",
                "constant-fold",
                "dead-nodes",
                "fuse-swiglu",
                "pack-blocks"
            ]
        );
        let q = Policy::decide(HOST, &options(Precision::Q8_0, None));
        assert!(q.pipeline.names().contains(&"quantize-weights"));
        let exact = Policy::decide(HOST, &options(Precision::F32, None));
        assert!(!exact.keep_blocks);
        assert_eq!(
            exact.cache_type,
            KvType::F32,
            "f32 precision keeps an exact cache"
        );
        let asked = Policy::decide(HOST, &options(Precision::F32, Some(KvType::F16)));
        assert_eq!(asked.cache_type, KvType::F16, "an explicit cache type wins");
    }

    #[test]
    fn devices_without_host_kernels_run_pure_burn() {
        for precision in [Precision::Native, Precision::Q8_0, Precision::F32] {
            let p = Policy::decide(DEVICE_ONLY, &options(precision, Some(KvType::F16)));
            assert!(!p.keep_blocks, "{precision:?}: blocks need host kernels");
            assert_eq!(p.cache_type, KvType::F32);
            assert_eq!(
                p.pipeline.names(),
                ["fuse-matmul", "constant-fold", "dead-nodes"]
            );
        }
    }

    #[test]
    fn gpu_devices_keep_blocks_on_the_device() {
        let p = Policy::decide(GPU, &options(Precision::Native, None));
        assert!(p.keep_blocks);
        assert_eq!(p.cache_type, KvType::F16, "half the bytes decode reads");
        assert_eq!(
            p.pipeline.names(),
            [
                "fuse-matmul",
                "constant-fold",
                "dead-nodes",
                "upload-blocks"
            ]
        );
        let exact = Policy::decide(GPU, &options(Precision::F32, None));
        assert!(!exact.keep_blocks, "f32 precision widens every weight");
        assert_eq!(exact.cache_type, KvType::F32, "and keeps an exact cache");
        let listed = SessionOptions {
            passes: "fuse-matmul,constant-fold".parse().expect("pass names"),
            ..SessionOptions::default()
        };
        let without = Policy::decide(GPU, &listed);
        assert!(
            !without.keep_blocks,
            "blocks stay only where upload-blocks takes them to the device"
        );
    }

    #[test]
    fn pass_lists_are_checked_by_name() {
        assert_eq!("default".parse::<Passes>().ok(), Some(Passes::Default));
        assert_eq!("none".parse::<Passes>().ok(), Some(Passes::None));
        assert_eq!(
            "fuse-matmul, dead-nodes".parse::<Passes>().ok(),
            Some(Passes::List(vec![
                "fuse-matmul".into(),
                "dead-nodes".into()
            ]))
        );
        let err = "fuse-matmul,fold-everything".parse::<Passes>().unwrap_err();
        assert!(
            err.to_string().contains("unknown pass `fold-everything`"),
            "{err}"
        );
    }
}
