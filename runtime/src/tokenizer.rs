//! Text to ids and back, through the HF `tokenizers` crate.
use std::path::Path;

use crate::error::{Result, RuntimeError};

/// A model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| RuntimeError::Tokenizer {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Ok(Tokenizer {
            inner,
            path: path.display().to_string(),
        })
    }

    fn err(&self, e: impl ToString) -> RuntimeError {
        RuntimeError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Ids of `text`, with the special tokens the tokenizer's post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// A decoder that yields text as ids arrive, never half a character.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            printed: 0,
        }
    }
}

/// Incremental detokenization: each push returns the text that is now final.
///
/// Decodes all ids so far and emits what follows the already printed prefix, holding
/// back text that ends in an incomplete UTF-8 sequence (shown by the decoder as U+FFFD).
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || !text.is_char_boundary(self.printed.min(text.len()))
            || text.len() < self.printed
        {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }

    /// Whatever is still held back at the end.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        let rest = text.get(self.printed..).unwrap_or("").to_string();
        self.printed = text.len();
        Ok(rest)
    }
}
