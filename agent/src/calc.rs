//! The calculator tool: a small evaluator of arithmetic expressions (numbers, `+ - * /
//! % ^`, parentheses, unary minus) written for the purpose, so that nothing the model
//! writes is ever run as code.
use serde_json::{json, Value};

use crate::error::ToolError;
use crate::tool::Tool;

/// Longest expression accepted, in bytes (bounds the work and the recursion).
const MAX_LEN: usize = 1000;
/// Deepest nesting of parentheses and unary minus accepted.
const MAX_DEPTH: usize = 64;

/// Why an expression has no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalcError {
    #[error("division by zero")]
    DivisionByZero,
    #[error("syntax error at byte {at}: {what}")]
    Syntax { at: usize, what: String },
    #[error("the result is not a finite number")]
    NotFinite,
    #[error("the expression is longer than {MAX_LEN} bytes or nested deeper than {MAX_DEPTH}")]
    TooBig,
}

/// Evaluates `text`: `+ - * / %` and `^` (power, right-associative, above unary minus
/// as in mathematics: `-2^2` is -4), parentheses, decimal numbers with an optional
/// exponent (`1.5e3`); `,` between digits groups thousands (`1,234`).
pub fn evaluate(text: &str) -> Result<f64, CalcError> {
    if text.len() > MAX_LEN {
        return Err(CalcError::TooBig);
    }
    let mut p = Parser {
        src: text.as_bytes(),
        at: 0,
        depth: 0,
    };
    let value = p.sum()?;
    p.skip_space();
    if p.at < p.src.len() {
        return Err(p.error(format!("unexpected `{}`", p.src[p.at] as char)));
    }
    if value.is_finite() {
        Ok(value)
    } else {
        Err(CalcError::NotFinite)
    }
}

/// A value as a person writes it: integers without a fraction, others to 12
/// significant digits without trailing zeros.
pub fn format_number(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    let digits = 12 - (v.abs().log10().floor() as i32 + 1);
    if (0..=17).contains(&digits) {
        let s = format!("{v:.*}", digits as usize);
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        format!("{v:e}")
    }
}

struct Parser<'a> {
    src: &'a [u8],
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, what: String) -> CalcError {
        CalcError::Syntax { at: self.at, what }
    }

    fn skip_space(&mut self) {
        while self.at < self.src.len() && self.src[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.src.get(self.at).copied()
    }

    fn deeper(&mut self) -> Result<(), CalcError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            Err(CalcError::TooBig)
        } else {
            Ok(())
        }
    }

    /// sum: product (('+' | '-') product)*
    fn sum(&mut self) -> Result<f64, CalcError> {
        let mut v = self.product()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.at += 1;
            let r = self.product()?;
            v = if op == b'+' { v + r } else { v - r };
        }
        Ok(v)
    }

    /// product: unary (('*' | '/' | '%') unary)*
    fn product(&mut self) -> Result<f64, CalcError> {
        let mut v = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(b'*') if self.src.get(self.at + 1) == Some(&b'*') => break,
                Some(op @ (b'*' | b'/' | b'%' | b'x' | b'\xc3')) => op,
                _ => break,
            };
            // `×` (U+00D7, bytes C3 97) and a lone `x` read as multiplication too,
            // since models and people write them.
            if op == b'\xc3' {
                if self.src.get(self.at + 1) != Some(&0x97) {
                    break;
                }
                self.at += 2;
            } else {
                self.at += 1;
            }
            let r = self.unary()?;
            v = match op {
                b'/' | b'%' if r == 0.0 => return Err(CalcError::DivisionByZero),
                b'/' => v / r,
                b'%' => v % r,
                _ => v * r,
            };
        }
        Ok(v)
    }

    /// unary: ('-' | '+') unary | power
    fn unary(&mut self) -> Result<f64, CalcError> {
        match self.peek() {
            Some(op @ (b'-' | b'+')) => {
                self.at += 1;
                self.deeper()?;
                let v = self.unary()?;
                self.depth -= 1;
                Ok(if op == b'-' { -v } else { v })
            }
            _ => self.power(),
        }
    }

    /// power: atom (('^' | '**') unary)?, right-associative.
    fn power(&mut self) -> Result<f64, CalcError> {
        let base = self.atom()?;
        let op_len = match self.peek() {
            Some(b'^') => 1,
            Some(b'*') if self.src.get(self.at + 1) == Some(&b'*') => 2,
            _ => return Ok(base),
        };
        self.at += op_len;
        self.deeper()?;
        let exp = self.unary()?;
        self.depth -= 1;
        if base == 0.0 && exp < 0.0 {
            return Err(CalcError::DivisionByZero);
        }
        Ok(base.powf(exp))
    }

    /// atom: number | '(' sum ')'
    fn atom(&mut self) -> Result<f64, CalcError> {
        match self.peek() {
            Some(b'(') => {
                self.at += 1;
                self.deeper()?;
                let v = self.sum()?;
                self.depth -= 1;
                if self.peek() != Some(b')') {
                    return Err(self.error("expected `)`".into()));
                }
                self.at += 1;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => self.number(),
            Some(c) => Err(self.error(format!("expected a number, found `{}`", c as char))),
            None => Err(self.error("the expression ends early".into())),
        }
    }

    fn number(&mut self) -> Result<f64, CalcError> {
        let start = self.at;
        let mut text = String::new();
        let digit = |p: &Self, i: usize| p.src.get(i).is_some_and(u8::is_ascii_digit);
        while let Some(&c) = self.src.get(self.at) {
            if c.is_ascii_digit() || c == b'.' {
                text.push(c as char);
                self.at += 1;
            } else if c == b',' && digit(self, self.at + 1) && !text.contains('.') {
                // A thousands separator: `1,234`.
                self.at += 1;
            } else if (c == b'e' || c == b'E')
                && (digit(self, self.at + 1)
                    || (matches!(self.src.get(self.at + 1), Some(b'-' | b'+'))
                        && digit(self, self.at + 2)))
            {
                text.push('e');
                text.push(self.src[self.at + 1] as char);
                self.at += 2;
            } else {
                break;
            }
        }
        text.parse::<f64>().map_err(|_| CalcError::Syntax {
            at: start,
            what: format!("`{text}` is not a number"),
        })
    }
}

/// The calculator as a tool: `{"expression": "..."}` in, the value out.
#[derive(Debug, Default, Clone, Copy)]
pub struct Calculator;

impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }

    fn description(&self) -> &str {
        "Evaluates an arithmetic expression exactly: numbers, + - * / % ^ and parentheses. \
         Use it for any arithmetic."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "The arithmetic expression, for example (12 + 3) * 4"
                }
            },
            "required": ["expression"],
            "additionalProperties": false
        })
    }

    fn call(&self, arguments: &Value) -> Result<String, ToolError> {
        let expression = arguments
            .get("expression")
            .and_then(Value::as_str)
            .ok_or_else(|| ToolError::Arguments("`expression` must be a string".into()))?;
        evaluate(expression)
            .map(format_number)
            .map_err(|e| ToolError::Failed(format!("{expression}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str) -> f64 {
        evaluate(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(ev("1 + 2 * 3"), 7.0);
        assert_eq!(ev("(1 + 2) * 3"), 9.0);
        assert_eq!(ev("2 ^ 3 ^ 2"), 512.0);
        assert_eq!(ev("2 ** 10"), 1024.0);
        assert_eq!(ev("-2 ^ 2"), -4.0);
        assert_eq!(ev("(-2) ^ 2"), 4.0);
        assert_eq!(ev("10 - 4 - 3"), 3.0);
        assert_eq!(ev("100 / 10 / 5"), 2.0);
        assert_eq!(ev("17 % 5"), 2.0);
        assert_eq!(ev("--3"), 3.0);
        assert_eq!(ev("2 * -3"), -6.0);
        assert_eq!(ev("1,234 * 2"), 2468.0);
        assert_eq!(ev("1.5e3 + .5"), 1500.5);
        assert_eq!(ev("7 × 6"), 42.0);
        assert_eq!(ev("7 x 6"), 42.0);
        assert_eq!(ev("1234 * 5678"), 7_006_652.0);
    }

    #[test]
    fn errors() {
        assert_eq!(evaluate("1 / 0"), Err(CalcError::DivisionByZero));
        assert_eq!(evaluate("1 % (2 - 2)"), Err(CalcError::DivisionByZero));
        assert_eq!(evaluate("0 ^ -1"), Err(CalcError::DivisionByZero));
        for bad in [
            "",
            "1 +",
            "(1 + 2",
            "1 + 2)",
            "abc",
            "1 2",
            "2 ^",
            "1..2",
            "import os",
            "*3",
        ] {
            assert!(
                matches!(evaluate(bad), Err(CalcError::Syntax { .. })),
                "{bad:?} gave {:?}",
                evaluate(bad)
            );
        }
        assert_eq!(evaluate("10 ^ 400"), Err(CalcError::NotFinite));
        assert_eq!(evaluate(&"(".repeat(200)), Err(CalcError::TooBig));
        assert_eq!(evaluate(&"-".repeat(200)), Err(CalcError::TooBig));
        assert_eq!(evaluate(&"1+".repeat(600)), Err(CalcError::TooBig));
    }

    #[test]
    fn numbers_print_as_written() {
        assert_eq!(format_number(7_006_652.0), "7006652");
        assert_eq!(format_number(-4.0), "-4");
        assert_eq!(format_number(0.1 + 0.2), "0.3");
        assert_eq!(format_number(1.0 / 3.0), "0.333333333333");
        assert_eq!(format_number(2.5), "2.5");
    }

    #[test]
    fn as_a_tool() {
        let c = Calculator;
        assert_eq!(c.call(&json!({"expression": "6 * 7"})).unwrap(), "42");
        assert!(matches!(c.call(&json!({})), Err(ToolError::Arguments(_))));
        let e = c.call(&json!({"expression": "1/0"})).unwrap_err();
        assert_eq!(e.to_string(), "1/0: division by zero");
    }
}
