//! The runner driven by scripted models: the loop, its limits, tool failures and
//! timeouts, and custom graphs. The engine's own model is exercised end to end in the
//! `llama agent` tests.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llama_agent::{
    Agent, AgentError, Calculator, Condition, Graph, Limits, Model, Node, Reply, StepKind, Stop,
    Tool, ToolError, Toolbox, ANSWER_INSTRUCTION,
};
use llama_runtime::{ToolCall, ToolChoice, ToolSpec};
use serde_json::{json, Value};

/// Each turn: the conversation shown and the tool choice.
type Turns = Arc<Mutex<Vec<(Vec<Value>, ToolChoice)>>>;

/// A model that plays back its replies and records what each turn was shown.
#[derive(Clone, Default)]
struct Scripted {
    replies: Arc<Mutex<VecDeque<Reply>>>,
    seen: Turns,
    /// Replies when the script runs out: the same call again, forever.
    forever: Option<Reply>,
}

impl Scripted {
    fn new(replies: Vec<Reply>) -> Scripted {
        Scripted {
            replies: Arc::new(Mutex::new(replies.into())),
            ..Scripted::default()
        }
    }
    fn turns(&self) -> Vec<(Vec<Value>, ToolChoice)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Model for Scripted {
    fn turn(
        &mut self,
        messages: &[Value],
        spec: &ToolSpec,
        _max_tokens: usize,
    ) -> llama_agent::Result<Reply> {
        self.seen
            .lock()
            .unwrap()
            .push((messages.to_vec(), spec.choice.clone()));
        let next = self.replies.lock().unwrap().pop_front();
        let reply = next
            .or_else(|| self.forever.clone())
            .expect("the script ran out");
        // A model under `none` cannot call: the constraint forbids it.
        if spec.choice == ToolChoice::None {
            assert!(reply.calls.is_empty(), "a call under tool_choice none");
        }
        Ok(reply)
    }
}

fn text(t: &str) -> Reply {
    Reply {
        text: t.into(),
        tokens: 5,
        ..Reply::default()
    }
}

fn call(id: &str, name: &str, arguments: Value) -> Reply {
    Reply {
        calls: vec![ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: arguments.to_string(),
        }],
        tokens: 10,
        ..Reply::default()
    }
}

fn calc() -> Toolbox {
    Toolbox::new().with(Calculator).unwrap()
}

#[test]
fn a_call_its_result_and_the_answer_that_uses_it() {
    let model = Scripted::new(vec![
        call("c1", "calculator", json!({"expression": "1234 * 5678"})),
        text("1234 * 5678 = 7006652"),
    ]);
    let mut agent = Agent::new(model.clone(), calc());
    let mut seen_steps = 0;
    let run = agent
        .run("What is 1234 * 5678?", |_| seen_steps += 1)
        .unwrap();
    assert_eq!(run.stop, Stop::Answered);
    assert_eq!(run.answer.as_deref(), Some("1234 * 5678 = 7006652"));
    assert_eq!(seen_steps, run.trace.len());
    let tool = run
        .trace
        .iter()
        .find_map(|s| match &s.kind {
            StepKind::Tool { name, result, .. } => Some((name.clone(), result.clone())),
            _ => None,
        })
        .expect("a tool step");
    assert_eq!(tool, ("calculator".to_string(), Ok("7006652".to_string())));
    // The second turn saw the call and its result, in OpenAI's shape.
    let turns = model.turns();
    assert_eq!(turns.len(), 2);
    let second = &turns[1].0;
    assert_eq!(second[1]["role"], "assistant");
    assert_eq!(second[1]["tool_calls"][0]["id"], "c1");
    assert_eq!(second[1]["tool_calls"][0]["function"]["name"], "calculator");
    assert_eq!(second[2]["role"], "tool");
    assert_eq!(second[2]["tool_call_id"], "c1");
    assert_eq!(second[2]["content"], "7006652");
    assert_eq!(run.state.rounds, 2);
    assert_eq!(run.state.tokens, 15);
}

#[test]
fn the_round_limit_ends_a_looping_agent_with_a_message() {
    // A model that calls with new arguments every turn never repeats itself, so only
    // the round limit stops it.
    let replies = (0..100)
        .map(|i| {
            call(
                &format!("c{i}"),
                "calculator",
                json!({"expression": format!("{i} + 1")}),
            )
        })
        .collect();
    let mut agent = Agent::new(Scripted::new(replies), calc());
    agent.limits.max_rounds = 3;
    let run = agent.run("loop", |_| {}).unwrap();
    assert_eq!(run.stop, Stop::RoundLimit { rounds: 3 });
    assert!(run.answer.is_none());
    assert!(
        run.stop.to_string().contains("round limit (3)"),
        "{}",
        run.stop
    );
    let tools = run
        .trace
        .iter()
        .filter(|s| matches!(s.kind, StepKind::Tool { .. }))
        .count();
    assert_eq!(tools, 3);
}

#[test]
fn a_repeated_call_goes_to_an_answer_turn_that_cannot_call() {
    let same = call("c", "calculator", json!({"expression": "2 + 2"}));
    let model = Scripted::new(vec![same.clone(), same, text("It is 4.")]);
    let mut agent = Agent::new(model.clone(), calc());
    let run = agent.run("2+2?", |_| {}).unwrap();
    assert_eq!(run.answer.as_deref(), Some("It is 4."));
    let turns = model.turns();
    assert_eq!(turns.len(), 3);
    assert_eq!(turns[2].1, ToolChoice::None);
    let last = turns[2].0.last().unwrap();
    assert_eq!(last["role"], "user");
    assert_eq!(last["content"], ANSWER_INSTRUCTION);
    // Key order and spacing do not hide a repeat.
    let model = Scripted::new(vec![
        call("a", "calculator", json!({"expression": "1+1"})),
        Reply {
            calls: vec![ToolCall {
                id: "b".into(),
                name: "calculator".into(),
                arguments: "{ \"expression\" :  \"1+1\" }".into(),
            }],
            ..Reply::default()
        },
        text("2"),
    ]);
    let run = Agent::new(model.clone(), calc())
        .run("1+1", |_| {})
        .unwrap();
    assert_eq!(run.answer.as_deref(), Some("2"));
    assert_eq!(model.turns()[2].1, ToolChoice::None);
}

#[test]
fn tool_errors_go_back_to_the_model_or_end_the_run() {
    let replies = || {
        vec![
            call("u", "weather", json!({"city": "Paris"})),
            call("e", "calculator", json!({"expression": "1 / 0"})),
            call("a", "calculator", json!({"expr": "1"})),
            text("done"),
        ]
    };
    let model = Scripted::new(replies());
    let run = Agent::new(model.clone(), calc()).run("t", |_| {}).unwrap();
    assert_eq!(run.answer.as_deref(), Some("done"));
    let results: Vec<String> = model.turns()[3]
        .0
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(results.len(), 3);
    assert!(
        results[0].starts_with("error: there is no tool named `weather`")
            && results[0].contains("calculator"),
        "{}",
        results[0]
    );
    assert!(results[1].starts_with("error: 1 / 0:"), "{}", results[1]);
    assert!(
        results[2].contains("`expression` must be a string"),
        "{}",
        results[2]
    );

    let mut agent = Agent::new(Scripted::new(replies()), calc());
    agent.limits.stop_on_tool_error = true;
    let run = agent.run("t", |_| {}).unwrap();
    match &run.stop {
        Stop::ToolFailed { name, error } => {
            assert_eq!(name, "weather");
            assert!(matches!(error, ToolError::Unknown { .. }));
        }
        other => panic!("{other:?}"),
    }
    assert!(run.answer.is_none());
}

/// A tool that never returns.
struct Stuck;

impl Tool for Stuck {
    fn name(&self) -> &str {
        "stuck"
    }
    fn description(&self) -> &str {
        "never returns"
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {}})
    }
    fn call(&self, _: &Value) -> Result<String, ToolError> {
        loop {
            std::thread::park();
        }
    }
}

/// A tool that panics.
struct Crashes;

impl Tool for Crashes {
    fn name(&self) -> &str {
        "crashes"
    }
    fn description(&self) -> &str {
        "panics"
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {}})
    }
    fn call(&self, _: &Value) -> Result<String, ToolError> {
        panic!("boom")
    }
}

#[test]
fn a_tool_that_never_returns_times_out_and_the_run_goes_on() {
    let tools = Toolbox::new().with(Stuck).unwrap().with(Crashes).unwrap();
    let model = Scripted::new(vec![
        call("s", "stuck", json!({})),
        call("c", "crashes", json!({})),
        text("gave up"),
    ]);
    let mut agent = Agent::new(model.clone(), tools);
    agent.limits.tool_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let run = agent.run("t", |_| {}).unwrap();
    // Bounded by the timeout, not by the tool.
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(run.answer.as_deref(), Some("gave up"));
    let errors: Vec<ToolError> = run
        .trace
        .iter()
        .filter_map(|s| match &s.kind {
            StepKind::Tool { result, .. } => result.clone().err(),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            ToolError::Timeout(Duration::from_secs(2)),
            ToolError::Panicked
        ]
    );
    let shown = &model.turns()[2].0;
    let timeout = shown.iter().find(|m| m["tool_call_id"] == "s").unwrap();
    assert!(
        timeout["content"].as_str().unwrap().contains("abandoned"),
        "{timeout}"
    );
}

#[test]
fn the_token_budget_ends_the_run() {
    let replies = (0..10)
        .map(|i| {
            call(
                &format!("c{i}"),
                "calculator",
                json!({"expression": format!("{i}")}),
            )
        })
        .collect();
    let mut agent = Agent::new(Scripted::new(replies), calc());
    agent.limits.max_tokens = 25;
    agent.limits.max_rounds = 10;
    let run = agent.run("t", |_| {}).unwrap();
    assert_eq!(run.stop, Stop::TokenBudget { tokens: 25 });
    assert_eq!(run.state.tokens, 30);
    assert!(run.stop.to_string().contains("token budget (25 tokens)"));
}

#[test]
fn malformed_graphs_and_tools_are_refused_before_any_turn() {
    let model = Scripted::new(vec![]);
    let mut agent = Agent::new(model.clone(), calc());
    agent.graph = Graph::new(vec![Node::CallTools { next: 7 }], 0);
    let e = agent.run("t", |_| {}).unwrap_err();
    assert!(matches!(e, AgentError::Graph(_)), "{e}");
    assert!(e.to_string().contains("node 7"), "{e}");

    agent.graph = Graph::tool_loop(Some(("search", "query")), false);
    let e = agent.run("t", |_| {}).unwrap_err();
    assert!(e.to_string().contains("`search`"), "{e}");

    agent.graph = Graph::new(vec![Node::End], 3);
    let e = agent.run("t", |_| {}).unwrap_err();
    assert!(e.to_string().contains("start node 3"), "{e}");

    // A tool whose name or schema cannot be offered.
    struct Bad;
    impl Tool for Bad {
        fn name(&self) -> &str {
            "has space"
        }
        fn description(&self) -> &str {
            ""
        }
        fn parameters(&self) -> Value {
            json!({"type": "object"})
        }
        fn call(&self, _: &Value) -> Result<String, ToolError> {
            Ok(String::new())
        }
    }
    let mut agent = Agent::new(model.clone(), Toolbox::new().with(Bad).unwrap());
    let e = agent.run("t", |_| {}).unwrap_err();
    assert!(matches!(e, AgentError::Tools(_)), "{e}");
    assert!(e.to_string().contains("has space"), "{e}");
    let e = calc().with(Calculator).unwrap_err();
    assert!(e.to_string().contains("used twice"), "{e}");
    assert!(model.turns().is_empty());
}

#[test]
fn a_custom_graph_branches_on_the_state_and_retrieves_first() {
    // Retrieval before the first turn, then a branch of the program's own.
    let model = Scripted::new(vec![text("short"), text("a longer answer")]);
    let long_enough: Arc<dyn Fn(&llama_agent::State) -> bool + Send + Sync> =
        Arc::new(|s: &llama_agent::State| s.text.len() > 10);
    let graph = Graph::new(
        vec![
            Node::Retrieve {
                tool: "calculator".into(),
                argument: "expression".into(),
                next: 1,
            },
            Node::Generate {
                choice: ToolChoice::Auto,
                instruction: None,
                next: 2,
            },
            Node::Branch {
                condition: Condition::Custom {
                    name: "long enough".into(),
                    test: long_enough,
                },
                then: 4,
                otherwise: 3,
            },
            Node::Generate {
                choice: ToolChoice::None,
                instruction: Some("Say more.".into()),
                next: 2,
            },
            Node::End,
        ],
        0,
    );
    let mut agent = Agent::new(model.clone(), calc());
    agent.graph = graph;
    let run = agent.run("6 * 7", |_| {}).unwrap();
    assert_eq!(run.answer.as_deref(), Some("a longer answer"));
    let first = &model.turns()[0].0;
    // The task itself went to the tool, and its result to the first turn.
    assert_eq!(
        first[1]["tool_calls"][0]["function"]["arguments"],
        json!({"expression": "6 * 7"}).to_string()
    );
    assert_eq!(first[2]["content"], "42");
    let branches: Vec<bool> = run
        .trace
        .iter()
        .filter_map(|s| match &s.kind {
            StepKind::Branch { condition, taken } => {
                assert_eq!(condition, "long enough");
                Some(*taken)
            }
            _ => None,
        })
        .collect();
    assert_eq!(branches, vec![false, true]);
    assert_eq!(Limits::default().max_rounds, 5);
}

#[test]
fn a_round_that_brings_nothing_new_goes_to_the_answer_turn() {
    // A small model's habit: calling the tool again on its own result.
    let model = Scripted::new(vec![
        call("a", "calculator", json!({"expression": "2 * 3"})),
        call("b", "calculator", json!({"expression": "6"})),
        text("2 * 3 = 6"),
    ]);
    let run = Agent::new(model.clone(), calc())
        .run("2*3?", |_| {})
        .unwrap();
    assert_eq!(run.answer.as_deref(), Some("2 * 3 = 6"));
    let turns = model.turns();
    assert_eq!(turns.len(), 3);
    assert_eq!(turns[2].1, ToolChoice::None);
    assert_eq!(turns[2].0.last().unwrap()["content"], ANSWER_INSTRUCTION);
    assert!(run.trace.iter().any(|s| matches!(&s.kind,
        StepKind::Branch { condition, taken: true } if condition.contains("repeats an earlier"))));
}

#[test]
fn the_tool_loop_can_require_the_first_call() {
    let model = Scripted::new(vec![
        call("a", "calculator", json!({"expression": "6 * 7"})),
        text("42"),
    ]);
    let mut agent = Agent::new(model.clone(), calc());
    agent.graph = Graph::tool_loop(None, true);
    let run = agent.run("6*7?", |_| {}).unwrap();
    assert_eq!(run.answer.as_deref(), Some("42"));
    let choices: Vec<ToolChoice> = model.turns().into_iter().map(|t| t.1).collect();
    assert_eq!(choices, vec![ToolChoice::Required, ToolChoice::Auto]);
}

#[test]
fn a_call_cut_off_mid_arguments_is_an_error_the_model_sees() {
    let model = Scripted::new(vec![
        Reply {
            calls: vec![ToolCall {
                id: "cut".into(),
                name: "calculator".into(),
                arguments: "{\"expression\": \"1 / 1000000".into(),
            }],
            tokens: 256,
            truncated: true,
            ..Reply::default()
        },
        text("sorry"),
    ]);
    let run = Agent::new(model.clone(), calc()).run("t", |_| {}).unwrap();
    assert_eq!(run.answer.as_deref(), Some("sorry"));
    let shown = &model.turns()[1].0;
    assert_eq!(shown[1]["tool_calls"][0]["function"]["arguments"], "{}");
    assert!(
        shown[2]["content"].as_str().unwrap().contains("not JSON"),
        "{}",
        shown[2]
    );
}
