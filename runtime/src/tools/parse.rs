//! Reading answers back: the streaming parser that turns a model's call syntax into
//! text and call deltas, and the whole-answer view built from them.
use serde_json::Value;

use super::{call_id, ToolCall, ToolFormat, CLOSE, OPEN};

/// A piece of an answer as it streams: text, a call's start, or a piece of its
/// arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolDelta {
    Content(String),
    /// A new call: its index among the answer's calls, id and name.
    Start {
        index: usize,
        id: String,
        name: String,
    },
    /// More of the arguments of call `index`.
    Arguments {
        index: usize,
        text: String,
    },
}

/// A whole answer: its text (without call syntax) and its calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

impl Parsed {
    pub(super) fn from_deltas(deltas: Vec<ToolDelta>) -> Parsed {
        let mut p = Parsed::default();
        for d in deltas {
            match d {
                ToolDelta::Content(t) => p.content.push_str(&t),
                ToolDelta::Start { id, name, .. } => p.calls.push(ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                }),
                ToolDelta::Arguments { index, text } => {
                    if let Some(c) = p.calls.get_mut(index) {
                        c.arguments.push_str(&text);
                    }
                }
            }
        }
        if !p.calls.is_empty() {
            p.content = p.content.trim().to_string();
        }
        p
    }
}

/// Where the streaming reader is.
#[derive(Debug)]
enum Mode {
    /// Free text; `buf` holds what may be the start of an opening tag.
    Text,
    /// After an opening tag, before the arguments begin.
    Head,
    /// Inside the arguments value.
    Args {
        depth: usize,
        in_str: bool,
        esc: bool,
    },
    /// After the arguments, up to the closing tag.
    Tail,
}

/// Reads an answer as it streams into text and tool-call deltas. For the Hermes
/// format it passes text through until `<tool_call>` (holding back what may be the
/// start of one), announces each call once its name is known and streams its
/// arguments as they come; the generic format is one JSON object, read at the end.
#[derive(Debug)]
pub struct ToolParser {
    format: ToolFormat,
    mode: Mode,
    buf: String,
    calls: usize,
    /// Nothing but whitespace has come yet (an answer that starts with `{` is a
    /// call written without its tag).
    at_start: bool,
    /// The call being read opened with its tag.
    tagged: bool,
}

impl ToolParser {
    pub fn new(format: ToolFormat) -> Self {
        ToolParser {
            format,
            mode: Mode::Text,
            buf: String::new(),
            calls: 0,
            at_start: true,
            tagged: false,
        }
    }

    /// Deltas for `text`, the answer's next piece.
    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        if self.format == ToolFormat::Generic {
            return out;
        }
        loop {
            match &mut self.mode {
                Mode::Text => {
                    if self.at_start {
                        let t = self.buf.trim_start();
                        if t.is_empty() {
                            return out;
                        }
                        self.at_start = false;
                        if t.starts_with('{') {
                            let ws = self.buf.len() - t.len();
                            self.buf.drain(..ws);
                            self.tagged = false;
                            self.mode = Mode::Head;
                            continue;
                        }
                    }
                    if let Some(at) = self.buf.find(OPEN) {
                        let before: String = self.buf[..at].to_string();
                        self.buf.drain(..at + OPEN.len());
                        // Whitespace before a call is not content.
                        if !before.trim().is_empty() {
                            out.push(ToolDelta::Content(before));
                        }
                        self.tagged = true;
                        self.mode = Mode::Head;
                        continue;
                    }
                    // Keep back a tail that could begin the tag.
                    let keep = (1..OPEN.len())
                        .rev()
                        .find(|&k| self.buf.ends_with(&OPEN[..k]))
                        .unwrap_or(0);
                    let cut = self.buf.len() - keep;
                    if cut > 0 {
                        out.push(ToolDelta::Content(self.buf[..cut].to_string()));
                        self.buf.drain(..cut);
                    }
                    return out;
                }
                Mode::Head => {
                    let Some((name, args_at)) = head(&self.buf) else {
                        return out;
                    };
                    out.push(ToolDelta::Start {
                        index: self.calls,
                        id: call_id(),
                        name,
                    });
                    self.buf.drain(..args_at);
                    self.mode = Mode::Args {
                        depth: 0,
                        in_str: false,
                        esc: false,
                    };
                }
                Mode::Args { depth, in_str, esc } => {
                    let mut end = None;
                    for (i, c) in self.buf.char_indices() {
                        if *in_str {
                            match (c, *esc) {
                                (_, true) => *esc = false,
                                ('\\', false) => *esc = true,
                                ('"', false) => *in_str = false,
                                _ => {}
                            }
                            continue;
                        }
                        match c {
                            '"' => *in_str = true,
                            '{' | '[' => *depth += 1,
                            '}' | ']' => {
                                *depth = depth.saturating_sub(1);
                                if *depth == 0 {
                                    end = Some(i + 1);
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    let upto = end.unwrap_or(self.buf.len());
                    if upto > 0 {
                        out.push(ToolDelta::Arguments {
                            index: self.calls,
                            text: self.buf[..upto].to_string(),
                        });
                        self.buf.drain(..upto);
                    }
                    if end.is_none() {
                        return out;
                    }
                    self.calls += 1;
                    self.mode = Mode::Tail;
                }
                Mode::Tail => {
                    let Some(at) = self.buf.find(CLOSE) else {
                        return out;
                    };
                    self.buf.drain(..at + CLOSE.len());
                    // Whitespace between calls is not content.
                    let trimmed = self.buf.trim_start().len();
                    self.buf.drain(..self.buf.len() - trimmed);
                    self.mode = Mode::Text;
                }
            }
        }
    }

    /// The deltas left at the end of the answer.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        let rest = std::mem::take(&mut self.buf);
        match self.format {
            ToolFormat::Generic => generic_deltas(rest),
            ToolFormat::Hermes { .. } => match self.mode {
                // What was held back was not a tag after all.
                Mode::Text if !rest.is_empty() => vec![ToolDelta::Content(rest)],
                // An unfinished call (the answer was cut): its text stays content.
                Mode::Head if !rest.is_empty() => {
                    let tag = if self.tagged { OPEN } else { "" };
                    vec![ToolDelta::Content(format!("{tag}{rest}"))]
                }
                _ => Vec::new(),
            },
        }
    }
}

/// The name of a call whose head (`{"name": "x", "arguments": `) is all in `buf`,
/// and where its arguments begin; `None` until the first character of the
/// arguments arrives.
fn head(buf: &str) -> Option<(String, usize)> {
    let key = buf.find("\"arguments\"")?;
    let after = &buf[key + "\"arguments\"".len()..];
    let colon = after.find(':')?;
    let value = &after[colon + 1..];
    let ws = value.len() - value.trim_start().len();
    if value.trim_start().is_empty() {
        return None;
    }
    let args_at = buf.len() - value.len() + ws;
    let name_key = buf.find("\"name\"")?;
    let rest = buf[name_key + "\"name\"".len()..]
        .trim_start()
        .strip_prefix(':')?;
    let mut it = serde_json::Deserializer::from_str(rest.trim_start()).into_iter::<String>();
    let name = it.next()?.ok()?;
    Some((name, args_at))
}

/// The generic format's answer: `{"tool_call": ...}`, `{"tool_calls": [...]}` or
/// `{"response": "..."}`; anything else is text.
fn generic_deltas(text: String) -> Vec<ToolDelta> {
    let value: Option<Value> = serde_json::from_str(text.trim()).ok();
    let calls: Option<Vec<Value>> = value.as_ref().and_then(|v| {
        if let Some(c) = v.get("tool_call") {
            Some(vec![c.clone()])
        } else {
            v.get("tool_calls").and_then(Value::as_array).cloned()
        }
    });
    if let Some(calls) = calls {
        let mut out = Vec::new();
        for (index, c) in calls.iter().enumerate() {
            let (Some(name), Some(args)) = (c["name"].as_str(), c.get("arguments")) else {
                return vec![ToolDelta::Content(text)];
            };
            out.push(ToolDelta::Start {
                index,
                id: call_id(),
                name: name.to_string(),
            });
            out.push(ToolDelta::Arguments {
                index,
                text: args.to_string(),
            });
        }
        return out;
    }
    if let Some(r) = value
        .as_ref()
        .and_then(|v| v.get("response"))
        .and_then(Value::as_str)
    {
        return vec![ToolDelta::Content(r.to_string())];
    }
    if text.is_empty() {
        Vec::new()
    } else {
        vec![ToolDelta::Content(text)]
    }
}
