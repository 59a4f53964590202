//! Chat templates: the model's own Jinja template, rendered with minijinja.
use llama_models::gguf::MetaValue;
use llama_models::{Model, ModelSource};
use serde::Serialize;

use crate::error::{Result, RuntimeError};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A model's chat template and where it came from.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// Where the template was found, for error messages (`tokenizer_config.json`, ...).
    pub source: String,
    pub template: String,
    pub bos_token: String,
    pub eos_token: String,
}

fn special_token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        // `{"content": "<s>", ...}` in older tokenizer configs.
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The model's template, looked up as HF does: `chat_template.jinja`, then
    /// `tokenizer_config.json`; in a GGUF file, `tokenizer.chat_template`.
    pub fn for_model(model: &Model) -> Result<Option<ChatTemplate>> {
        Self::for_source(&model.source)
    }

    /// As [`ChatTemplate::for_model`], from an opened model source.
    pub fn for_source(source: &ModelSource) -> Result<Option<ChatTemplate>> {
        match source {
            ModelSource::HfDir(dir) => {
                let config_path = dir.join("tokenizer_config.json");
                let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
                    Ok(text) => {
                        serde_json::from_str(&text).map_err(|e| RuntimeError::Template {
                            source_name: config_path.display().to_string(),
                            message: e.to_string(),
                        })?
                    }
                    Err(_) => serde_json::Value::Null,
                };
                let bos_token = special_token_text(config.get("bos_token"));
                let eos_token = special_token_text(config.get("eos_token"));
                let jinja = dir.join("chat_template.jinja");
                if let Ok(template) = std::fs::read_to_string(&jinja) {
                    return Ok(Some(ChatTemplate {
                        source: jinja.display().to_string(),
                        template,
                        bos_token,
                        eos_token,
                    }));
                }
                let template = match config.get("chat_template") {
                    Some(serde_json::Value::String(t)) => Some(t.clone()),
                    // A list of named templates: take `default`.
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_string),
                    _ => None,
                };
                Ok(template.map(|template| ChatTemplate {
                    source: config_path.display().to_string(),
                    template,
                    bos_token,
                    eos_token,
                }))
            }
            ModelSource::Gguf(file) => {
                let token = |k: &str| {
                    let id = file.get(k).and_then(MetaValue::as_u64)?;
                    let tokens = file
                        .get("tokenizer.ggml.tokens")
                        .and_then(MetaValue::as_strings)?;
                    tokens.get(id as usize).map(str::to_string)
                };
                Ok(file
                    .get("tokenizer.chat_template")
                    .and_then(MetaValue::as_str)
                    .map(|template| ChatTemplate {
                        source: format!("{} (tokenizer.chat_template)", file.path.display()),
                        template: template.to_string(),
                        bos_token: token("tokenizer.ggml.bos_token_id").unwrap_or_default(),
                        eos_token: token("tokenizer.ggml.eos_token_id").unwrap_or_default(),
                    }))
            }
        }
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let err = |e: minijinja::Error| RuntimeError::Template {
            source_name: self.source.clone(),
            message: match e.detail() {
                Some(d) => format!("{}: {d}", e.kind()),
                None => e.to_string(),
            },
        };
        let mut env = minijinja::Environment::new();
        // Templates are written for Python's Jinja: allow `.strip()`, `.items()`, ...
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.template).map_err(err)?;
        let template = env.get_template("chat").map_err(err)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(err)
    }
}
