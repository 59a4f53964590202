//! Constrained decoding: outputs that stay inside a grammar.
//!
//! [`Grammars`] holds, once per model, the token trie that `llguidance` walks: every
//! token's bytes, read from our own tokenizer's definition (special tokens marked so
//! that a grammar never produces one by accident). [`Grammars::compile`] checks a
//! [`Grammar`] (a JSON schema, any JSON object, a Lark grammar or a regex) and returns
//! a [`Constraint`]; each sequence that carries one starts its own matcher from it, so
//! the sequences of a batched step are constrained independently. At every step the
//! decoder asks the matcher which tokens keep the output inside the grammar and bans
//! the others before any sampling stage, then feeds it the token chosen.
//!
//! A schema keyword the compiler cannot enforce is an error naming it, never ignored.
use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::{Result, RuntimeError};
use crate::tokenizer::Tokenizer;

/// What an output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A value valid under this JSON schema.
    JsonSchema(Value),
    /// A Lark grammar (llguidance's dialect; it may embed JSON schemas with `%json`).
    Lark(String),
    /// Text the regex matches in full.
    Regex(String),
}

impl Grammar {
    /// A short name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Grammar::JsonObject => "JSON object",
            Grammar::JsonSchema(_) => "JSON schema",
            Grammar::Lark(_) => "Lark grammar",
            Grammar::Regex(_) => "regex",
        }
    }

    /// As llguidance's grammar. JSON is written as models usually write it (`", "`
    /// and `": "`, no other whitespace) unless the schema sets its own `x-guidance`
    /// options: free whitespace lets a sampled model pad an answer without end.
    fn top_level(&self) -> Result<TopLevelGrammar> {
        let json_options = json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        });
        Ok(match self {
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(json!({
                "type": "object",
                "x-guidance": json_options,
            })),
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert(json_options);
                } else if !schema.is_boolean() {
                    // `true` and `false` are schemas too; they have nowhere to put options.
                    return Err(RuntimeError::Grammar(
                        "a JSON schema must be an object (or true / false)".into(),
                    ));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
        })
    }
}

/// Our tokenizer as llguidance sees it: the trie of token bytes, and tokenization
/// for the strings a grammar forces.
struct Vocab {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        // Grammars are text: bytes that are not UTF-8 can only be the trie's own.
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode_plain(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The grammar compiler of one model: its token trie and end ids.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    vocab: usize,
    /// Per token: its text, after any whitespace, begins a JSON object.
    opens_object: Arc<Vec<bool>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl Grammars {
    /// The compiler for a model whose logits have `vocab` entries, whose tokenizer is
    /// `tokenizer`, and which ends a turn with any of `eos` (a grammar that is complete
    /// lets these through).
    pub fn new(tokenizer: &Tokenizer, vocab: usize, eos: &[u32]) -> Result<Self> {
        let bad = |m: String| RuntimeError::Grammar(format!("the tokenizer's vocabulary: {m}"));
        let json: Value = serde_json::from_str(&tokenizer.to_json()?)
            .map_err(|e| bad(format!("not JSON: {e}")))?;
        // Bytes of every token (byte-level BPE unmapped, SentencePiece's `▁` and
        // `<0xNN>` pieces resolved, special tokens behind llguidance's marker byte).
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| bad(e.to_string()))?;
        // Ids past the tokenizer (padding rows of the output matrix) have no bytes:
        // no grammar ever allows them.
        words.resize(vocab, Vec::new());
        let opens_object = words
            .iter()
            .map(|w| w.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'))
            .collect();
        let first_eos = eos.first().copied().unwrap_or(0);
        if let Some(&id) = eos.iter().find(|&&id| id as usize >= vocab) {
            return Err(bad(format!("end id {id} is outside {vocab} logits")));
        }
        let info = TokRxInfo::new(vocab as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(Vocab {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| bad(e.to_string()))?;
        factory.quiet();
        Ok(Grammars {
            factory: Arc::new(factory),
            vocab,
            opens_object: Arc::new(opens_object),
        })
    }

    /// Checks `grammar` and compiles it for this model. An unsupported schema
    /// keyword, a Lark syntax error or an unsatisfiable schema is an error here.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let top = grammar.top_level()?;
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| RuntimeError::Grammar(format!("{}: {e}", grammar.kind())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher_error(&matcher) {
            return Err(RuntimeError::Grammar(format!("{}: {e}", grammar.kind())));
        }
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
            trigger: None,
            bare: None,
        })
    }

    /// `lazy` (a constraint that waits for its trigger token), and besides: when the
    /// answer's first token opens a JSON object, `bare` holds from there on. Small
    /// models often write a tool call as bare JSON without its opening tag; this keeps
    /// such a call inside the grammar too. At the first step, tokens that open an
    /// object are allowed only where `bare` allows them; other tokens are free.
    pub fn lazy_or_bare(&self, lazy: Constraint, bare: Constraint) -> Constraint {
        Constraint {
            bare: Some(Bare {
                matcher: bare.matcher,
                opens_object: self.opens_object.clone(),
            }),
            ..lazy
        }
    }
}

fn matcher_error(m: &Matcher) -> Option<String> {
    m.is_error().then(|| m.get_error().unwrap_or_default())
}

/// A compiled grammar, ready for any number of sequences (each clone starts afresh).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
    /// Constrain only what follows this token (free text before it).
    trigger: Option<u32>,
    /// With a trigger: the grammar of an answer that starts as a JSON object.
    bare: Option<Bare>,
}

/// The other start of a lazy constraint (see [`Grammars::lazy_or_bare`]).
#[derive(Clone)]
struct Bare {
    matcher: Matcher,
    opens_object: Arc<Vec<bool>>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("vocab", &self.vocab)
            .field("trigger", &self.trigger)
            .finish()
    }
}

impl Constraint {
    /// The same grammar, applied only after the model produces `token` (a tool-call
    /// opening tag, say): the text before it is free, the text after it must match.
    pub fn after_token(mut self, token: u32) -> Self {
        self.trigger = Some(token);
        self
    }

    /// A fresh matcher for one sequence.
    pub(crate) fn start(&self) -> Active {
        Active {
            matcher: self.matcher.clone(),
            vocab: self.vocab,
            waiting_for: self.trigger,
            bare: self.trigger.and(self.bare.clone()),
            time: Duration::ZERO,
            steps: 0,
        }
    }
}

/// One sequence's matcher as it advances.
pub(crate) struct Active {
    matcher: Matcher,
    vocab: usize,
    waiting_for: Option<u32>,
    /// At the first step of a lazy constraint: the grammar if the answer opens an object.
    bare: Option<Bare>,
    /// Time spent computing masks and advancing the matcher.
    pub time: Duration,
    /// Masks computed.
    pub steps: usize,
}

impl Active {
    /// `logits` with every token the grammar does not allow next set to minus
    /// infinity, or `None` while the constraint is not in force.
    pub fn mask(&mut self, logits: &[f32]) -> Result<Option<Vec<f32>>> {
        if self.waiting_for.is_some() {
            return self.mask_first(logits);
        }
        let start = Instant::now();
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| RuntimeError::Grammar(e.to_string()))?;
        if mask.is_zero() {
            return Err(RuntimeError::Grammar(
                "no token can continue the output inside the grammar".into(),
            ));
        }
        let mut masked = logits.to_vec();
        for (id, l) in masked.iter_mut().enumerate().take(self.vocab) {
            if !mask.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        // Logits past the trie (there are none when the widths agree) are never allowed.
        for l in masked.iter_mut().skip(self.vocab) {
            *l = f32::NEG_INFINITY;
        }
        self.time += start.elapsed();
        self.steps += 1;
        Ok(Some(masked))
    }

    /// The first step of a lazy constraint with a bare start: a token that opens an
    /// object must be one the bare grammar allows.
    fn mask_first(&mut self, logits: &[f32]) -> Result<Option<Vec<f32>>> {
        let Some(bare) = self.bare.as_mut() else {
            return Ok(None);
        };
        let start = Instant::now();
        let mask = bare
            .matcher
            .compute_mask()
            .map_err(|e| RuntimeError::Grammar(e.to_string()))?;
        let mut masked = logits.to_vec();
        for (id, l) in masked.iter_mut().enumerate().take(self.vocab) {
            if bare.opens_object[id] && !mask.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        self.time += start.elapsed();
        self.steps += 1;
        Ok(Some(masked))
    }

    /// Feeds the chosen token; says whether the grammar is now complete (nothing may
    /// follow).
    pub fn advance(&mut self, token: u32) -> Result<bool> {
        if let Some(bare) = self.bare.take() {
            if bare.opens_object.get(token as usize) == Some(&true) {
                self.waiting_for = None;
                self.matcher = bare.matcher;
            }
        }
        if let Some(trigger) = self.waiting_for {
            if token == trigger {
                self.waiting_for = None;
            }
            return Ok(false);
        }
        let start = Instant::now();
        self.matcher
            .consume_token(token)
            .map_err(|e| RuntimeError::Grammar(e.to_string()))?;
        self.time += start.elapsed();
        Ok(self.matcher.is_stopped())
    }

    /// Whether the output so far may end here (always, before a trigger).
    pub fn accepting(&mut self) -> bool {
        self.waiting_for.is_some() || self.matcher.is_accepting().unwrap_or(false)
    }
}
