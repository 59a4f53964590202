//! rig, an agent framework, as a client of the server's tool calls (Qwen2.5 0.5B, whose
//! chat template has a tools section): rig's agent loop sends the tool's schema, runs
//! the tool the model calls with arguments rig parsed into a typed struct, sends the
//! result back and ends with an answer, streaming and not.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use llama::serve::ServerConfig;
use rig_agent::agent::{
    AgentHook, CompletionCallAction, CompletionCallEvent, HookContext, MultiTurnStreamItem,
    RequestPatch,
};
use rig_agent::prelude::*;
use rig_agent::tool::ToolContext;
use rig_core::message::ToolChoice;
use rig_core::providers::openai;
use rig_core::streaming::StreamedAssistantContent;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::qwen25_path;
use crate::server::{engine_options, TestServer};

/// A price the model cannot know: an answer that holds it used the tool's result.
const PRICE: &str = "4817";
const QUESTION: &str = "What is the price of a widget in EUR? Use the tools.";

/// The tool's arguments as a program relies on them: rig deserializes the model's
/// arguments into this type, so a call that does not fit the schema fails the run.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct PriceArgs {
    item: String,
    currency: Currency,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq)]
enum Currency {
    #[serde(rename = "EUR")]
    Eur,
    #[serde(rename = "USD")]
    Usd,
}

/// Looks a price up and records every call it gets.
#[derive(Clone, Default)]
struct GetPrice {
    calls: Arc<Mutex<Vec<PriceArgs>>>,
}

impl Tool for GetPrice {
    const NAME: &'static str = "get_price";
    type Args = PriceArgs;
    type Output = String;
    type Error = Infallible;

    fn description(&self) -> String {
        "Looks up the current price of an item in the shop.".into()
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "item": {"type": "string", "description": "The item's name"},
                "currency": {"type": "string", "enum": ["EUR", "USD"]}
            },
            "required": ["item", "currency"],
            "additionalProperties": false
        })
    }

    async fn call(&self, _: &mut ToolContext, args: PriceArgs) -> Result<String, Infallible> {
        let currency = match args.currency {
            Currency::Eur => "EUR",
            Currency::Usd => "USD",
        };
        self.calls.lock().expect("calls").push(args);
        Ok(format!("{PRICE} {currency}"))
    }
}

/// Once a turn has run the tools, the next one answers: a 0.5B model left free to
/// call again tends to call the tool on its own result. Agent authors steer small
/// models this way; rig's hooks are the place for it.
struct AnswerAfterTools;

impl AgentHook for AnswerAfterTools {
    async fn on_completion_call(
        &self,
        _ctx: &HookContext,
        call: CompletionCallEvent<'_>,
    ) -> CompletionCallAction {
        if call.turn > 1 {
            CompletionCallAction::patch(RequestPatch::new().tool_choice(ToolChoice::None))
        } else {
            CompletionCallAction::Continue
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rig_agent_calls_the_tool_and_answers_with_its_result() {
    let server = TestServer::start_model(
        qwen25_path(),
        engine_options(),
        ServerConfig {
            alias: "qwen".into(),
            parallel: 2,
            ..ServerConfig::default()
        },
    )
    .await;
    let client = openai::CompletionsClient::builder()
        .api_key("unused")
        .base_url(server.url("/v1"))
        .build()
        .expect("rig client");
    for streaming in [false, true] {
        let tool = GetPrice::default();
        let agent = client
            .agent("qwen")
            .preamble("You are a shop assistant. Answer with the numbers the tools return.")
            .temperature(0.0)
            .max_tokens(128)
            .tool(tool.clone())
            .add_hook(AnswerAfterTools)
            .build();
        let answer = if streaming {
            let mut stream = agent.stream_prompt(QUESTION).max_turns(3).await;
            let (mut answer, mut streamed_calls) = (None, 0);
            while let Some(item) = stream.next().await {
                match item.expect("stream item") {
                    MultiTurnStreamItem::StreamAssistantItem(
                        StreamedAssistantContent::ToolCall { tool_call, .. },
                    ) => {
                        assert_eq!(tool_call.function.name, "get_price");
                        streamed_calls += 1;
                    }
                    MultiTurnStreamItem::FinalResponse(response) => answer = Some(response.output),
                    _ => {}
                }
            }
            assert_eq!(streamed_calls, 1, "one streamed call");
            answer.expect("a final response")
        } else {
            agent
                .prompt(QUESTION)
                .max_turns(3)
                .await
                .expect("agent run")
        };
        let calls = tool.calls.lock().expect("calls").clone();
        assert_eq!(calls.len(), 1, "streaming {streaming}: calls {calls:?}");
        assert_eq!(calls[0].currency, Currency::Eur, "{calls:?}");
        assert!(calls[0].item.to_lowercase().contains("widget"), "{calls:?}");
        assert!(
            answer.replace(',', "").contains(PRICE),
            "streaming {streaming}: the answer does not use the result: {answer}"
        );
    }
}
