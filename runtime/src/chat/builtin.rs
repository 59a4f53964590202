//! Built-in chat templates, for model files that carry none (Gemma 3 270M's GGUF has
//! no `tokenizer.chat_template`) and for `--chat-template NAME`.
//!
//! Each follows its family's published prompt format; the model's own template,
//! where a file has one, always wins.
use llama_models::Family;

/// ChatML (`<|im_start|>role\n...<|im_end|>`): Qwen2, SmolLM and many fine-tunes.
const CHATML: &str = "\
{%- for m in messages -%}
{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}";

/// Gemma: `user` and `model` turns; a system message opens the first user turn.
const GEMMA: &str = "\
{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first = (messages[0]['content'] or '') | trim + '\\n\\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set first = '' -%}
{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + (m['content'] or '') | trim + '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}";

/// Llama 3: header-delimited turns ending in `<|eot_id|>`.
const LLAMA3: &str = "\
{{ bos_token }}
{%- for m in messages -%}
{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] or '') | trim + '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}";

/// Phi-3: `<|role|>\n...<|end|>`.
const PHI3: &str = "\
{%- for m in messages -%}
{{ '<|' + m['role'] + '|>\\n' + (m['content'] or '') + '<|end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}";

/// The built-in templates by name.
pub const BUILTIN: [(&str, &str); 4] = [
    ("chatml", CHATML),
    ("gemma", GEMMA),
    ("llama3", LLAMA3),
    ("phi3", PHI3),
];

/// The template text of a built-in name.
pub fn builtin(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The built-in template for a family whose file has none; `has_token` tells whether
/// the vocabulary holds a token (Llama-architecture files are Llama 3 when they have
/// `<|eot_id|>`, else ChatML as most small Llama-architecture chat models use).
pub fn for_family(family: Family, has_token: impl Fn(&str) -> bool) -> &'static str {
    match family {
        Family::Gemma | Family::Gemma3 => "gemma",
        Family::Phi3 => "phi3",
        Family::Llama if has_token("<|eot_id|>") => "llama3",
        _ => "chatml",
    }
}

/// The tokens that end a turn in the built-in templates: generation stops at them.
pub const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"];
