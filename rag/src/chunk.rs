//! Splitting a text into overlapping windows of tokens.

/// Splits `text` into chunks of at most `max_tokens` tokens, consecutive
/// chunks sharing `overlap` tokens, and returns their `(start, end)` byte
/// ranges.
///
/// `tokens` are the byte spans `(start, end)` of the text's tokens as the
/// embedding model's tokenizer sees them, in order. Spans past the end of the
/// text are clamped and spans inside a UTF-8 character are widened to whole
/// characters, so every range returned lies on character boundaries.
///
/// * The chunks cover the whole text: the first starts at 0, the last ends at
///   `text.len()`, and each chunk ends where the next token after it starts
///   (the whitespace between two chunks belongs to the first).
/// * A chunk that would otherwise be cut mid-flow ends at a paragraph break
///   (a blank line) when one lies between two tokens of its last quarter, else
///   at a sentence end (`.`, `!` or `?` followed by whitespace, or a line
///   break) when one lies there.
/// * `max_tokens` is at least 1 and `overlap` at most `max_tokens - 1`; every
///   chunk starts at least one token after the previous one.
/// * An empty or whitespace-only text has no chunks; a text with no tokens is
///   one chunk.
pub fn chunk_spans(
    text: &str,
    tokens: &[(usize, usize)],
    max_tokens: usize,
    overlap: usize,
) -> Vec<(usize, usize)> {
    if text.trim().is_empty() {
        return Vec::new();
    }
    let spans = clean_spans(text, tokens);
    if spans.is_empty() {
        return vec![(0, text.len())];
    }
    let max = max_tokens.max(1);
    let overlap = overlap.min(max - 1);
    let n = spans.len();

    let mut chunks: Vec<(usize, usize)> = Vec::new();
    let mut first = 0;
    loop {
        let limit = (first + max).min(n);
        let cut = if limit == n {
            n
        } else {
            best_cut(text, &spans, first, limit, overlap, max)
        };
        let start = if chunks.is_empty() { 0 } else { spans[first].0 };
        let end = if cut == n { text.len() } else { spans[cut].0 };
        match chunks.last_mut() {
            // Token spans inside one character start at the same boundary: the
            // earlier chunk is then a prefix of this one.
            Some(last) if last.0 == start => last.1 = last.1.max(end),
            _ if end > start => chunks.push((start, end)),
            _ => {}
        }
        if cut == n {
            break;
        }
        first = (cut - overlap).max(first + 1);
    }
    chunks
}

/// Clamps spans to the text, widens them to character boundaries and makes
/// their starts non-decreasing.
fn clean_spans(text: &str, tokens: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(tokens.len());
    let mut floor = 0;
    for &(start, end) in tokens {
        let start = char_floor(text, start.min(text.len())).max(floor);
        let end = char_ceil(text, end.min(text.len())).max(start);
        out.push((start, end));
        floor = start;
    }
    out
}

fn char_floor(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn char_ceil(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// Where to end a chunk that starts at token `first` and may hold tokens up
/// to `limit` (exclusive): the latest paragraph break in its last quarter,
/// else the latest sentence end there, else `limit`. The result leaves the
/// next chunk (which starts `overlap` tokens earlier) past `first`.
fn best_cut(
    text: &str,
    spans: &[(usize, usize)],
    first: usize,
    limit: usize,
    overlap: usize,
    max: usize,
) -> usize {
    let lowest = (limit - max / 4).max(first + overlap + 1);
    if lowest > limit {
        return limit;
    }
    let kinds: Vec<(usize, Boundary)> = (lowest..=limit)
        .rev()
        .map(|cut| (cut, boundary(text, spans, cut)))
        .collect();
    for wanted in [Boundary::Paragraph, Boundary::Sentence] {
        if let Some((cut, _)) = kinds.iter().find(|(_, kind)| *kind == wanted) {
            return *cut;
        }
    }
    limit
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Boundary {
    None,
    Sentence,
    Paragraph,
}

/// What kind of break lies between token `cut - 1` and token `cut`: the text
/// from the start of the former to the start of the latter, plus the
/// whitespace that the latter begins with (tokenizers that glue a space to
/// the next word).
fn boundary(text: &str, spans: &[(usize, usize)], cut: usize) -> Boundary {
    let from = spans[cut - 1].0;
    let to = spans[cut].0;
    let glued = text[to..].len() - text[to..].trim_start().len();
    let seg = &text[from..to + glued];
    let body = seg.trim_end();
    let space = &seg[body.len()..];
    if space.is_empty() {
        return Boundary::None;
    }
    let newlines = space.matches('\n').count();
    if newlines >= 2 {
        return Boundary::Paragraph;
    }
    let ends_sentence = body
        .trim_end_matches(['"', '\'', ')', ']', '”', '’'])
        .ends_with(['.', '!', '?', '。', '！', '？']);
    if newlines == 1 || ends_sentence {
        Boundary::Sentence
    } else {
        Boundary::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words and punctuation marks as tokens, whitespace between them.
    fn word_tokens(text: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices() {
            let end = i + c.len_utf8();
            if c.is_alphanumeric() {
                if start.is_none() {
                    start = Some(i);
                }
                continue;
            }
            if let Some(s) = start.take() {
                out.push((s, i));
            }
            if !c.is_whitespace() {
                out.push((i, end));
            }
        }
        if let Some(s) = start {
            out.push((s, text.len()));
        }
        out
    }

    /// Tokens of a byte-level tokenizer: one per byte, even inside characters.
    fn byte_tokens(text: &str) -> Vec<(usize, usize)> {
        (0..text.len()).map(|i| (i, i + 1)).collect()
    }

    fn tokens_in(tokens: &[(usize, usize)], span: (usize, usize)) -> usize {
        tokens
            .iter()
            .filter(|t| t.0 >= span.0 && t.1 <= span.1)
            .count()
    }

    fn check_cover(text: &str, chunks: &[(usize, usize)]) {
        assert_eq!(chunks.first().map(|c| c.0), Some(0));
        assert_eq!(chunks.last().map(|c| c.1), Some(text.len()));
        for pair in chunks.windows(2) {
            assert!(pair[1].0 <= pair[0].1, "gap between {pair:?}");
            assert!(pair[1].0 > pair[0].0, "no progress {pair:?}");
        }
        for c in chunks {
            assert!(text.is_char_boundary(c.0) && text.is_char_boundary(c.1));
            assert!(c.0 < c.1);
        }
    }

    #[test]
    fn empty_and_blank_text_have_no_chunks() {
        assert!(chunk_spans("", &[], 10, 2).is_empty());
        assert!(chunk_spans(" \n\t ", &[(0, 1)], 10, 2).is_empty());
    }

    #[test]
    fn short_text_is_one_chunk() {
        let text = "  one two three  ";
        let toks = word_tokens(text);
        assert_eq!(chunk_spans(text, &toks, 10, 3), vec![(0, text.len())]);
        assert_eq!(chunk_spans("abc", &[], 10, 3), vec![(0, 3)]);
    }

    #[test]
    fn windows_respect_max_and_overlap() {
        let text = (0..100)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let toks = word_tokens(&text);
        let chunks = chunk_spans(&text, &toks, 10, 3);
        check_cover(&text, &chunks);
        for c in &chunks {
            assert!(tokens_in(&toks, *c) <= 10, "{c:?}");
        }
        // No boundaries in the text: every chunk is full and shares 3 tokens.
        for pair in chunks.windows(2) {
            let shared = tokens_in(&toks, (pair[1].0, pair[0].1));
            assert_eq!(shared, 3, "{pair:?}");
        }
        assert_eq!(tokens_in(&toks, chunks[0]), 10);
        assert_eq!(&text[chunks[1].0..chunks[1].0 + 2], "w7");
        // 100 tokens, 7 new per chunk after the first: 1 + ceil(90 / 7).
        assert_eq!(chunks.len(), 14);
    }

    #[test]
    fn zero_overlap_chunks_are_contiguous() {
        let text = "a b c d e f g h i j k";
        let toks = word_tokens(text);
        let chunks = chunk_spans(text, &toks, 4, 0);
        check_cover(text, &chunks);
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].1, pair[1].0);
        }
        assert_eq!(chunks, vec![(0, 8), (8, 16), (16, 21)]);
    }

    #[test]
    fn degenerate_sizes_still_progress() {
        let text = "a b c d e";
        let toks = word_tokens(text);
        let chunks = chunk_spans(text, &toks, 0, 5);
        check_cover(text, &chunks);
        assert_eq!(chunks.len(), 5);
        let chunks = chunk_spans(text, &toks, 2, 9);
        check_cover(text, &chunks);
        assert_eq!(chunks.len(), 4);
    }

    #[test]
    fn prefers_paragraph_then_sentence_in_last_quarter() {
        // 16 tokens per chunk: the last quarter is its last 4 tokens.
        let para = "a b c d e f g h i j k l m.\n\nn o p q r s t u v";
        let toks = word_tokens(para);
        let chunks = chunk_spans(para, &toks, 16, 0);
        check_cover(para, &chunks);
        assert!(para[..chunks[0].1].ends_with("m.\n\n"), "{chunks:?}");

        let sent = "a b c d e f g h i j k l m. n o p q r s t u v";
        let toks = word_tokens(sent);
        let chunks = chunk_spans(sent, &toks, 16, 0);
        assert!(sent[..chunks[0].1].ends_with("m. "), "{chunks:?}");

        // A paragraph break wins over a later sentence end.
        let both = "a b c d e f g h i j k l\n\nm. n o p q r s t u v";
        let toks = word_tokens(both);
        let chunks = chunk_spans(both, &toks, 16, 0);
        assert!(both[..chunks[0].1].ends_with("l\n\n"), "{chunks:?}");

        // A break before the last quarter is ignored.
        let early = "a b. c d e f g h i j k l m n o p q r s t u v";
        let toks = word_tokens(early);
        let chunks = chunk_spans(early, &toks, 16, 0);
        assert_eq!(tokens_in(&toks, chunks[0]), 16);
    }

    #[test]
    fn boundary_with_space_glued_to_next_token() {
        // Tokens like " word" (space first), as byte-pair tokenizers make them.
        let text = "one two three four five six seven eight.\n\nnine ten eleven twelve";
        let mut toks = Vec::new();
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_whitespace() && i > start && !text[start..i].trim().is_empty() {
                toks.push((start, i));
                start = i;
            }
        }
        toks.push((start, text.len()));
        let chunks = chunk_spans(text, &toks, 8, 0);
        check_cover(text, &chunks);
        assert!(text[..chunks[0].1].ends_with("eight."), "{chunks:?}");
    }

    #[test]
    fn never_splits_utf8_chars() {
        let text = "héllo wörld 日本語のテキスト ☃☃☃ 🎉🎉 ok.\n\nnext ünïcode";
        for toks in [byte_tokens(text), word_tokens(text)] {
            for max in 1..12 {
                for overlap in 0..max {
                    let chunks = chunk_spans(text, &toks, max, overlap);
                    check_cover(text, &chunks);
                }
            }
        }
        // Spans that run past the text are clamped.
        let chunks = chunk_spans("ab", &[(0, 1), (1, 50), (60, 70)], 1, 0);
        assert_eq!(chunks.last().map(|c| c.1), Some(2));
    }

    #[test]
    fn byte_tokens_respect_max_bytes() {
        let text = "abcdefghij".repeat(10);
        let toks = byte_tokens(&text);
        let chunks = chunk_spans(&text, &toks, 16, 4);
        check_cover(&text, &chunks);
        for c in &chunks {
            assert!(c.1 - c.0 <= 16);
        }
    }
}
