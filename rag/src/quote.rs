//! The sentence a quote-style answer quotes: the sentences of the retrieved sources
//! (headings left out), each scored against the question by embedding similarity,
//! the question's words it holds, and whether it holds the kind of fact asked for
//! ([`crate::answer_kind`]).
use llama_runtime::{cosine, Embedder};

use crate::answer_kind::{answer_kind, asked, holds};
use crate::pipeline::{Quote, Source};
use crate::{RagError, Result};

/// The sentences of `text`: its lines (Markdown heading and list marks dropped) cut
/// after `.`, `?` or `!` followed by a space; those of three words or more.
pub fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line
            .trim()
            .trim_start_matches(|c: char| matches!(c, '#' | '-' | '*' | '>') || c.is_whitespace());
        let bytes = line.as_bytes();
        let mut start = 0;
        for i in 0..bytes.len() {
            let end = matches!(bytes[i], b'.' | b'?' | b'!')
                && bytes.get(i + 1).is_none_or(|b| *b == b' ');
            if end {
                out.push(line[start..=i].trim());
                start = i + 1;
            }
        }
        out.push(line[start..].trim());
    }
    out.retain(|s| s.split_whitespace().count() >= 3);
    out
}

/// The sentences of `text` a quote may be: as [`sentences`], less headings (Markdown
/// `#` lines, and a first line without closing punctuation, which is a title). A
/// heading names the topic, so it matches a question well and answers none.
fn quotable(text: &str) -> Vec<&str> {
    let mut first = true;
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let title = first && !t.ends_with(['.', '!', '?', ':', ')']);
        first = false;
        if t.starts_with('#') || title {
            continue;
        }
        out.extend(sentences(line));
    }
    out
}

/// What a sentence gains for holding a fact of the kind its question asks for
/// ([`answer_kind`]): about what a tenth of the question's words or a clearly closer
/// embedding give, so it decides between sentences that match alike and never lifts
/// an unrelated sentence over a matching one.
const KIND_BONUS: f32 = 0.2;

/// The sentence of the given sources that best matches `question`: highest cosine
/// similarity of embeddings, plus half the share of the question's words (less
/// function words) that it holds, inflections matched ([`same_stem`]), plus
/// [`KIND_BONUS`] when it holds a fact of the kind the question asks for that the
/// question does not name. `None` when the sources have no sentence.
pub(crate) fn best_sentence(
    embedder: &Embedder,
    question: &str,
    sources: &[&Source],
) -> Result<Option<Quote>> {
    let candidates: Vec<(usize, &str)> = sources
        .iter()
        .flat_map(|s| quotable(&s.text).into_iter().map(move |t| (s.n, t)))
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    let mut texts = vec![question];
    texts.extend(candidates.iter().map(|(_, t)| *t));
    let vectors = embedder
        .embed_texts(&texts)
        .map_err(|e| RagError::Input(format!("embedding sentences to quote: {e}")))?;
    let terms = crate::query_terms(question);
    let kind = answer_kind(question);
    let asked = asked(question);
    let score = |i: usize, text: &str| {
        let words: Vec<String> = crate::keyword_terms(text);
        let shared = terms
            .iter()
            .filter(|t| words.iter().any(|w| same_stem(t, w)))
            .count();
        let typed = kind.is_some_and(|k| holds(k, text, &asked));
        cosine(&vectors[0], &vectors[i + 1])
            + 0.5 * shared as f32 / terms.len().max(1) as f32
            + if typed { KIND_BONUS } else { 0.0 }
    };
    let best = candidates
        .iter()
        .enumerate()
        .map(|(i, (n, text))| (score(i, text), *n, *text))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    Ok(best.map(|(_, n, text)| Quote {
        n,
        text: text.to_string(),
    }))
}

/// Whether two lowercase words are one word inflected: equal, or (both of four
/// letters or more) sharing their first five letters, or all of the shorter one's
/// when it has four (`blanch`, `blanched`; `belt`, `belts`). A crude stemmer, on
/// purpose: it only breaks near-ties between sentences the embedding ranks alike.
fn same_stem(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let (na, nb) = (a.chars().count(), b.chars().count());
    if na < 4 || nb < 4 {
        return false;
    }
    let n = na.min(nb).min(5);
    a.chars().take(n).eq(b.chars().take(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_are_cut_at_their_ends_and_lines() {
        let text = "# Garden waste service\nThe fee is £38. It is paid yearly! Ok\n\
                    - Bins go out on Monday mornings.\nVersion 2.5 is current? Yes it is";
        assert_eq!(
            sentences(text),
            vec![
                "Garden waste service",
                "The fee is £38.",
                "It is paid yearly!",
                "Bins go out on Monday mornings.",
                "Version 2.5 is current?",
                "Yes it is",
            ]
        );
        // Headings are not quoted: a `#` line, or a first line that does not end
        // as a sentence does.
        assert_eq!(quotable(text)[0], "The fee is £38.");
        assert!(same_stem("blanched", "blanch") && same_stem("belt", "belts"));
        assert!(!same_stem("kiln", "kind") && !same_stem("at", "as"));
        let plain = "Ashby Lane Studio: Kiln Rules\n\nThe large kiln is Bramble.";
        assert_eq!(quotable(plain), vec!["The large kiln is Bramble."]);
    }
}
