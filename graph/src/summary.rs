//! Readable, machine-stable summaries of node outputs (for taps and snapshots).
use std::fmt::Write;

use crate::error::Result;
use crate::value::Value;

/// `shape, mean, std, first values`, rounded to `digits` significant decimals so that
/// float noise between machines and backends does not change the text.
pub fn summarize(name: &str, value: &Value, digits: usize) -> Result<String> {
    let dims = value.dims();
    let data: Vec<f32> = match value {
        Value::I1(t) => t
            .to_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| crate::GraphError::Input(format!("{e:?}")))?
            .into_iter()
            .map(|x| x as f32)
            .collect(),
        v => v.to_f32_vec()?,
    };
    let n = data.len().max(1) as f64;
    let mean = data.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = data.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let mut out = String::new();
    let _ = write!(
        out,
        "{name} {dims:?} mean={} std={} first=[",
        round(mean, digits),
        round(var.sqrt(), digits)
    );
    for (i, x) in data.iter().take(4).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&round(*x as f64, digits));
    }
    out.push(']');
    Ok(out)
}

/// Rounds to `digits` decimals and prints without a negative zero.
fn round(x: f64, digits: usize) -> String {
    let s = format!("{x:.digits$}");
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}
