//! The model a runner talks to: [`Model`] is what the runner needs (one assistant turn
//! for a conversation under a tool spec), [`EngineModel`] is that turn on the engine,
//! in-process. Tests drive the runner with scripted models through the same trait.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use llama_runtime::{
    generate, ChatTemplate, Constraint, Engine, GenerateOptions, Grammars, SamplerConfig, Session,
    Tokenizer, ToolCall, ToolFormat, ToolSpec,
};
use serde_json::Value;

use crate::error::{AgentError, Result};

/// One assistant turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    /// The text outside calls.
    pub text: String,
    /// The calls made (none under `ToolChoice::None`).
    pub calls: Vec<ToolCall>,
    /// Tokens of the prompt, and how many of them came from the cached prefix.
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// Tokens generated.
    pub tokens: usize,
    /// Whether generation stopped at `max_tokens` rather than by itself.
    pub truncated: bool,
}

/// A chat model that can call tools.
pub trait Model {
    /// Checks that `spec` can be offered and enforced, before any turn: the runner
    /// calls it once per tool choice its graph uses.
    fn prepare(&mut self, spec: &ToolSpec) -> Result<()> {
        spec.check().map_err(|e| AgentError::Tools(untagged(e)))
    }

    /// The assistant's next turn after `messages` (OpenAI's shape), the tools of
    /// `spec` shown and callable as its choice says, at most `max_tokens` long.
    fn turn(&mut self, messages: &[Value], spec: &ToolSpec, max_tokens: usize) -> Result<Reply>;
}

/// A model on the engine: the prompt through the model's chat template and tool
/// format (the server's), calls constrained to the tools' names and schemas, greedy by
/// default. The session is kept between turns, so each turn only runs what is new
/// since the longest prefix it shares with the last one.
pub struct EngineModel<'e> {
    engine: &'e Engine,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    format: ToolFormat,
    grammars: Grammars,
    session: Session,
    eos: Vec<u32>,
    /// How turns are sampled.
    pub sampler: SamplerConfig,
    /// Compiled constraints by tool choice (compiling is the slow part).
    constraints: HashMap<String, Option<Constraint>>,
}

impl<'e> EngineModel<'e> {
    /// A model on `engine`, which must generate and have a chat template.
    pub fn new(engine: &'e Engine) -> Result<EngineModel<'e>> {
        engine.check_generates()?;
        let tokenizer = engine.tokenizer()?;
        let template = engine.chat_template()?;
        let format = ToolFormat::detect(&template, &tokenizer);
        let grammars = engine.grammars(&tokenizer)?;
        Ok(EngineModel {
            engine,
            session: engine.session()?,
            eos: engine.eos_token_ids(),
            sampler: SamplerConfig::default(),
            tokenizer,
            template,
            format,
            grammars,
            constraints: HashMap::new(),
        })
    }

    /// How this model is told about tools.
    pub fn format(&self) -> ToolFormat {
        self.format
    }

    /// A second model at the same point: its session a copy of this one's cache, so
    /// a branch of the conversation starts from the shared prefix without running it
    /// again.
    pub fn fork(&self) -> EngineModel<'e> {
        EngineModel {
            engine: self.engine,
            tokenizer: self.tokenizer.clone(),
            template: self.template.clone(),
            format: self.format,
            grammars: self.grammars.clone(),
            session: self.session.fork(),
            eos: self.eos.clone(),
            sampler: self.sampler.clone(),
            constraints: self.constraints.clone(),
        }
    }

    fn constraint(&mut self, spec: &ToolSpec) -> Result<Option<Constraint>> {
        let key = format!("{:?}", spec.choice);
        if let Some(c) = self.constraints.get(&key) {
            return Ok(c.clone());
        }
        let c = self
            .format
            .constraint(&self.grammars, spec)
            .map_err(|e| AgentError::Tools(untagged(e)))?;
        self.constraints.insert(key, c.clone());
        Ok(c)
    }
}

impl Model for EngineModel<'_> {
    fn prepare(&mut self, spec: &ToolSpec) -> Result<()> {
        spec.check().map_err(|e| AgentError::Tools(untagged(e)))?;
        self.constraint(spec).map(|_| ())
    }

    fn turn(&mut self, messages: &[Value], spec: &ToolSpec, max_tokens: usize) -> Result<Reply> {
        let constraint = self.constraint(spec)?;
        let prompt = self
            .format
            .prompt(&self.template, messages, Some(spec))
            .map_err(|e| AgentError::Tools(untagged(e)))?;
        let ids = self.tokenizer.encode_plain(&prompt)?;
        let context = self.session.context();
        if ids.len() >= context {
            return Err(AgentError::Context {
                tokens: ids.len(),
                context,
            });
        }
        let rest = self.session.sync_prefix(&ids)?;
        let cached = ids.len() - rest.len();
        let opts = GenerateOptions {
            max_tokens: max_tokens.min(context - ids.len()).max(1),
            sampler: self.sampler.clone(),
            eos: self.eos.clone(),
            constraint,
            ..GenerateOptions::default()
        };
        let g = generate(&mut self.session, &self.tokenizer, &rest, &opts, |_| {})?;
        let (text, calls) = if spec.active() {
            let parsed = self.format.parse(&g.text);
            (parsed.content, parsed.calls)
        } else {
            (g.text.clone(), Vec::new())
        };
        Ok(Reply {
            text: text.trim().to_string(),
            calls,
            prompt_tokens: ids.len(),
            cached_tokens: cached,
            tokens: g.ids.len(),
            truncated: g.finish == llama_runtime::FinishReason::Length,
        })
    }
}

/// A runtime error's message without its `tools: ` prefix (ours adds it back).
pub(crate) fn untagged(e: llama_runtime::RuntimeError) -> String {
    let s = e.to_string();
    s.strip_prefix("tools: ").map(str::to_string).unwrap_or(s)
}

/// How long `f` takes, with its result.
pub(crate) fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}
