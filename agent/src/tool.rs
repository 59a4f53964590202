//! Tools: a name, a description, a JSON schema of the arguments and one call (the
//! shape of rig's `Tool`). The [`Toolbox`] runs each call on a thread of its own under
//! a deadline, so a tool that never returns costs its thread, not the run.
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use llama_runtime::{Function, ToolChoice, ToolSpec};
use serde_json::Value;

use crate::error::{AgentError, Result, ToolError};
use crate::model::untagged;

/// Something the model may call. Implementations must be cheap to share between
/// threads: every call runs on its own thread.
pub trait Tool: Send + Sync {
    /// The name the model calls it by: 1 to 64 of `a-z A-Z 0-9 _ -`.
    fn name(&self) -> &str;
    /// What it does, for the model.
    fn description(&self) -> &str;
    /// A JSON schema (an object schema) of its arguments.
    fn parameters(&self) -> Value;
    /// Runs the call. The text returned is what the model reads.
    fn call(&self, arguments: &Value) -> Result<String, ToolError>;
}

/// The tools of a run, by name.
#[derive(Clone, Default)]
pub struct Toolbox {
    tools: BTreeMap<String, Arc<dyn Tool>>,
    order: Vec<String>,
}

impl std::fmt::Debug for Toolbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.order).finish()
    }
}

impl Toolbox {
    pub fn new() -> Toolbox {
        Toolbox::default()
    }

    /// Adds `tool`; a second tool of the same name is refused.
    pub fn add(&mut self, tool: Arc<dyn Tool>) -> Result<()> {
        let name = tool.name().to_string();
        if self.tools.contains_key(&name) {
            return Err(AgentError::Tools(format!(
                "the name `{name}` is used twice"
            )));
        }
        self.order.push(name.clone());
        self.tools.insert(name, tool);
        Ok(())
    }

    /// Adds `tool` (see [`Toolbox::add`]).
    pub fn with(mut self, tool: impl Tool + 'static) -> Result<Toolbox> {
        self.add(Arc::new(tool))?;
        Ok(self)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name)
    }

    pub fn names(&self) -> &[String] {
        &self.order
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The tools as the engine describes them to the model, under `choice`; names and
    /// schemas checked.
    pub fn spec(&self, choice: ToolChoice) -> Result<ToolSpec> {
        let functions = self
            .order
            .iter()
            .filter_map(|n| self.tools.get(n))
            .map(|t| Function {
                name: t.name().to_string(),
                description: Some(t.description().to_string()),
                parameters: t.parameters(),
            })
            .collect();
        let choice = if self.order.is_empty() {
            ToolChoice::None
        } else {
            choice
        };
        let spec = ToolSpec {
            functions,
            choice,
            parallel: false,
        };
        spec.check().map_err(|e| AgentError::Tools(untagged(e)))?;
        Ok(spec)
    }

    /// Runs the call of `name` with `arguments` (JSON text) on a thread of its own and
    /// waits at most `timeout` for it. A tool that does not return in time is left
    /// running on its detached thread, never joined.
    pub fn call(
        &self,
        name: &str,
        arguments: &str,
        timeout: Duration,
    ) -> Result<String, ToolError> {
        let Some(tool) = self.tools.get(name) else {
            return Err(ToolError::Unknown {
                name: name.to_string(),
                known: self.order.join(", "),
            });
        };
        let args: Value = if arguments.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            serde_json::from_str(arguments)
                .map_err(|e| ToolError::Arguments(format!("not JSON: {e}")))?
        };
        if !args.is_object() {
            return Err(ToolError::Arguments("not a JSON object".into()));
        }
        let tool = Arc::clone(tool);
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("tool-{name}"))
            .spawn(move || {
                // The receiver may be gone (timed out): nothing to do then.
                let _ = tx.send(tool.call(&args));
            });
        if spawned.is_err() {
            return Err(ToolError::Failed("could not start a thread for it".into()));
        }
        match rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ToolError::Timeout(timeout)),
            // The sender dropped without sending: the tool panicked.
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ToolError::Panicked),
        }
    }
}
