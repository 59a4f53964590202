//! What kind of fact a question asks for, and whether a sentence holds one that the
//! question does not already name: the answer typing of classic extractive question
//! answering. It picks the sentence a quote-style answer quotes: of the sentences
//! that match a question about as well, the one that holds an amount for "what does
//! it cost", a time for "what time", a number for "how many", a name for "who".
//!
//! Plain word rules, no model: they only break near-ties between sentences the
//! embedding and the shared words rank alike, and a question they do not type gets no
//! bonus at all.

/// The kind of fact a question asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// An amount of money: `£36`, `$12.50`, `40 euros`.
    Money,
    /// A time of day: `19:35`, `6:15 pm`, `noon`.
    Time,
    /// A time of day or a date: a year, a month, a weekday, or a time.
    When,
    /// A number or a code: `20 minutes`, `1.4 metres`, `PB-77562`, `port 9471`, `two`.
    Number,
    /// A proper name: `Hester Wrenfield`.
    Name,
}

/// The kind of fact `question` asks for, if its words say.
pub fn answer_kind(question: &str) -> Option<AnswerKind> {
    let words = crate::keyword_terms(question);
    let has = |w: &str| words.iter().any(|x| x == w);
    let pair = |a: &str, b: &[&str]| {
        words
            .windows(2)
            .any(|p| p[0] == a && b.contains(&p[1].as_str()))
    };
    const MONEY: &[&str] = &[
        "cost", "costs", "pay", "paid", "price", "fee", "fees", "charge", "charged", "fine",
        "deposit", "refund", "spend", "owe",
    ];
    const MEASURES: &[&str] = &[
        "torque",
        "temperature",
        "size",
        "length",
        "weight",
        "capacity",
        "distance",
        "depth",
        "height",
        "width",
        "speed",
        "percentage",
        "percent",
        "voltage",
        "pressure",
        "number",
        "port",
        "version",
        "code",
        "model",
        "serial",
        "age",
        "limit",
        "maximum",
        "minimum",
    ];
    if ["who", "whom", "whose"].iter().any(|w| has(w)) {
        return Some(AnswerKind::Name);
    }
    if pair("what", &["time", "hour"]) || pair("which", &["time", "hour"]) {
        return Some(AnswerKind::Time);
    }
    if MONEY.iter().any(|w| has(w)) && (has("what") || has("how")) {
        return Some(AnswerKind::Money);
    }
    if has("when")
        || pair("what", &["year", "date", "day", "month"])
        || pair("which", &["year", "date", "day", "month"])
    {
        return Some(AnswerKind::When);
    }
    let how = pair(
        "how",
        &[
            "many", "much", "long", "far", "old", "big", "heavy", "deep", "high", "tall", "wide",
            "fast", "hot", "cold", "often", "large", "small",
        ],
    );
    let measure = (has("what") || has("which")) && MEASURES.iter().any(|w| has(w));
    (how || measure).then_some(AnswerKind::Number)
}

/// The words of `question` as [`holds`] compares a sentence's with them: split at
/// spaces, the punctuation around each dropped (`£64` and `LX-470` stay whole),
/// lowercase. Made once per question, not once per sentence.
pub fn asked(question: &str) -> Vec<String> {
    question
        .split_whitespace()
        .map(|w| bare(w).to_lowercase())
        .collect()
}

/// Whether `sentence` holds a fact of `kind` that the question, whose words are
/// `asked` ([`asked`]), does not name.
pub fn holds(kind: AnswerKind, sentence: &str, asked: &[String]) -> bool {
    let tokens: Vec<&str> = sentence.split_whitespace().map(bare).collect();
    let next = |i: usize| {
        tokens
            .get(i + 1)
            .map(|t| t.to_lowercase())
            .unwrap_or_default()
    };
    tokens.iter().enumerate().any(|(i, &t)| {
        let lower = t.to_lowercase();
        if t.is_empty() || asked.contains(&lower) {
            return false;
        }
        let digit = t.chars().any(|c| c.is_ascii_digit());
        match kind {
            AnswerKind::Money => {
                digit
                    && (t.contains(['£', '$', '€', '¥'])
                        || ["pounds", "pence", "dollars", "cents", "euros", "p"]
                            .contains(&next(i).as_str())
                        || lower.ends_with('p') && lower[..lower.len() - 1].parse::<f64>().is_ok())
            }
            AnswerKind::Time => is_time(t, &next(i)),
            AnswerKind::When => is_time(t, &next(i)) || is_date(t),
            AnswerKind::Number => digit || NUMBER_WORDS.contains(&lower.as_str()),
            AnswerKind::Name => {
                i > 0
                    && t.chars().next().is_some_and(char::is_uppercase)
                    && t.chars().skip(1).any(char::is_lowercase)
                    && !crate::is_stopword(&lower)
            }
        }
    })
}

/// `w` without the punctuation around it (`£36,` is `£36`, `(PB-7)` is `PB-7`).
fn bare(w: &str) -> &str {
    w.trim_matches(|c: char| !c.is_alphanumeric() && !matches!(c, '£' | '$' | '€' | '¥' | '%'))
}

const NUMBER_WORDS: &[&str] = &[
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
    "seventy",
    "eighty",
    "ninety",
    "hundred",
    "thousand",
    "million",
    "dozen",
    "half",
    "twice",
    "once",
];

/// `19:35`, `6.15pm`, `9am`, `6 pm`, `noon`, `midnight`.
fn is_time(t: &str, next: &str) -> bool {
    let lower = t.to_lowercase();
    if lower == "noon" || lower == "midnight" {
        return true;
    }
    let core = lower
        .trim_end_matches("a.m")
        .trim_end_matches("p.m")
        .trim_end_matches("am")
        .trim_end_matches("pm");
    let suffixed = core.len() < lower.len();
    let numeric = !core.is_empty()
        && core
            .chars()
            .all(|c| c.is_ascii_digit() || c == ':' || c == '.');
    // `19:35` is a time; `6.15` only with am or pm (`12.50` is more often a price).
    let clock = core.split_once(':').is_some_and(|(h, m)| {
        !h.is_empty() && h.len() <= 2 && m.len() == 2 && h.parse::<u32>().is_ok_and(|h| h < 24)
    });
    numeric && (clock || suffixed || ["am", "pm", "a.m.", "p.m.", "o'clock"].contains(&next))
}

/// A year (1000 to 2099), a month or a weekday.
fn is_date(t: &str) -> bool {
    const NAMES: &[&str] = &[
        "january",
        "february",
        "march",
        "april",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "mondays",
        "tuesdays",
        "wednesdays",
        "thursdays",
        "fridays",
        "saturdays",
        "sundays",
    ];
    let lower = t.to_lowercase();
    // "May" only capitalized: "may" is a verb far more often.
    NAMES.contains(&lower.as_str())
        || t == "May"
        || t.len() == 4 && t.parse::<u32>().is_ok_and(|y| (1000..2100).contains(&y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_are_typed_by_their_words() {
        let cases = [
            (
                "If I settle a parking ticket quickly, what do I pay?",
                Some(AnswerKind::Money),
            ),
            (
                "What does it cost a student to join for a year?",
                Some(AnswerKind::Money),
            ),
            (
                "What time does the last boat leave?",
                Some(AnswerKind::Time),
            ),
            ("When does the survey start?", Some(AnswerKind::When)),
            (
                "In which year was the kiln installed?",
                Some(AnswerKind::When),
            ),
            (
                "How many rounds does the league have?",
                Some(AnswerKind::Number),
            ),
            (
                "To what torque should the bolt be tightened?",
                Some(AnswerKind::Number),
            ),
            (
                "Which part number is the replacement belt?",
                Some(AnswerKind::Number),
            ),
            (
                "Who kept the workshop going after he died?",
                Some(AnswerKind::Name),
            ),
            ("Why is the stew not salted?", None),
            ("Which portal must employees use?", None),
        ];
        for (q, want) in cases {
            assert_eq!(answer_kind(q), want, "{q}");
        }
    }

    #[test]
    fn sentences_hold_a_fact_the_question_does_not_name() {
        let q = "What does a permit cost?";
        assert!(holds(
            AnswerKind::Money,
            "A permit costs £64 a year.",
            &asked(q)
        ));
        assert!(holds(
            AnswerKind::Money,
            "The fine is 36 pounds.",
            &asked(q)
        ));
        assert!(!holds(
            AnswerKind::Money,
            "Permits are sold at the town hall.",
            &asked(q)
        ));
        // The amount the question already names is not an answer to it.
        let q = "What do I pay on top of the £64 permit?";
        assert!(!holds(AnswerKind::Money, "The permit is £64.", &asked(q)));
        assert!(holds(
            AnswerKind::Money,
            "A visitor pass adds £5.50.",
            &asked(q)
        ));

        let q = "What time does the last boat leave?";
        assert!(holds(
            AnswerKind::Time,
            "The last boat leaves at 19:35.",
            &asked(q)
        ));
        assert!(holds(
            AnswerKind::Time,
            "It leaves at 6 pm sharp.",
            &asked(q)
        ));
        assert!(holds(AnswerKind::Time, "Boats run until 9pm.", &asked(q)));
        assert!(!holds(
            AnswerKind::Time,
            "The boat holds 1.4 tonnes.",
            &asked(q)
        ));
        assert!(!holds(
            AnswerKind::Time,
            "It costs 12.50 a seat.",
            &asked(q)
        ));

        let q = "When was the kiln installed?";
        assert!(holds(
            AnswerKind::When,
            "It was installed in 2009.",
            &asked(q)
        ));
        assert!(holds(
            AnswerKind::When,
            "Rounds are played on Wednesdays.",
            &asked(q)
        ));
        assert!(!holds(
            AnswerKind::When,
            "You may book it by phone.",
            &asked(q)
        ));

        let q = "Which part number is the belt for the LX-470?";
        assert!(holds(AnswerKind::Number, "Use belt PB-77562.", &asked(q)));
        assert!(!holds(
            AnswerKind::Number,
            "The LX-470 belt slips.",
            &asked(q)
        ));
        assert!(holds(
            AnswerKind::Number,
            "It waits twenty minutes.",
            &asked(q)
        ));

        let q = "Who kept the workshop going?";
        assert!(holds(
            AnswerKind::Name,
            "His daughter Hester kept it open.",
            &asked(q)
        ));
        assert!(!holds(
            AnswerKind::Name,
            "The workshop closed in winter.",
            &asked(q)
        ));
        // The first word of a sentence is capitalized whatever it is.
        assert!(!holds(AnswerKind::Name, "Nobody kept it open.", &asked(q)));
    }
}
