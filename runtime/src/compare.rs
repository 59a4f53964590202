//! The first-divergence finder: run a prompt with every node tapped and compare each
//! output, in graph order, with a reference's value of the node of the same name (made
//! by `scripts/fixtures/make_compare_ref.py` from transformers). The first node whose output
//! departs beyond a tolerance is where a bring-up goes wrong: everything before it
//! agrees.
use std::path::Path;

use llama_graph::Taps;
use serde::Deserialize;

use crate::error::{Result, RuntimeError};
use crate::session::Session;

/// Reference activations: the input ids and named node outputs `[tokens, features]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Reference {
    pub input_ids: Vec<u32>,
    pub nodes: Vec<ReferenceNode>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceNode {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Reference {
    pub fn from_file(path: &Path) -> Result<Reference> {
        let bad = |message: String| RuntimeError::Reference {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let r: Reference = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if r.input_ids.is_empty() {
            return Err(bad("input_ids is empty".into()));
        }
        for n in &r.nodes {
            if n.shape.iter().product::<usize>() != n.data.len() {
                return Err(bad(format!(
                    "node {} has {} values for shape {:?}",
                    n.name,
                    n.data.len(),
                    n.shape
                )));
            }
        }
        Ok(r)
    }
}

/// Summary statistics of one output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub min: f32,
    pub max: f32,
}

impl Stats {
    fn of(data: &[f32]) -> Stats {
        let n = data.len().max(1) as f64;
        let mean = data.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = data.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        Stats {
            mean,
            std: var.sqrt(),
            min: data.iter().copied().fold(f32::INFINITY, f32::min),
            max: data.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mean {:.5} std {:.5} min {:.5} max {:.5}",
            self.mean, self.std, self.min, self.max
        )
    }
}

/// One node's output against the reference's.
#[derive(Debug, Clone)]
pub struct NodeDiff {
    pub name: String,
    /// Largest `|ours - reference|`.
    pub max_abs: f32,
    /// `max_abs` over the reference's largest magnitude: the measure the tolerance
    /// bounds, the same for a node of values near 1 and one near 100.
    pub relative: f32,
    /// The token (row) where the largest difference is.
    pub worst_token: usize,
    pub ours: Stats,
    pub reference: Stats,
}

impl NodeDiff {
    /// Within `tolerance` of the reference (a NaN never is).
    pub fn agrees(&self, tolerance: f32) -> bool {
        self.relative <= tolerance
    }
}

/// Every compared node in graph order, and which reference nodes the graph lacks
/// (renamed by a fusion pass: compare with `--passes none`).
#[derive(Debug, Clone)]
pub struct Comparison {
    pub nodes: Vec<NodeDiff>,
    pub missing: Vec<String>,
    pub tolerance: f32,
}

impl Comparison {
    /// The first node, in graph order, beyond the tolerance.
    pub fn first_divergence(&self) -> Option<&NodeDiff> {
        self.nodes.iter().find(|d| !d.agrees(self.tolerance))
    }
}

/// Runs `reference.input_ids` through `session` with every node tapped and compares
/// each node that the reference names. A node whose shape differs is an error naming it.
pub fn compare(session: &mut Session, reference: &Reference, tolerance: f32) -> Result<Comparison> {
    session.reset();
    let (_, taps) = session.prefill_with_taps(&reference.input_ids, &Taps::All)?;
    session.reset();
    let by_name: std::collections::HashMap<&str, &ReferenceNode> = reference
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n))
        .collect();
    let mut nodes = Vec::new();
    let mut found = std::collections::HashSet::new();
    for (name, value) in &taps {
        let Some(r) = by_name.get(name.as_str()) else {
            continue;
        };
        found.insert(name.as_str());
        let ours = value.to_f32_vec().map_err(RuntimeError::Graph)?;
        if ours.len() != r.data.len() {
            return Err(RuntimeError::ReferenceShape {
                node: name.clone(),
                ours: value.dims(),
                reference: r.shape.clone(),
            });
        }
        let width = r.shape.last().copied().unwrap_or(1).max(1);
        let (mut max_abs, mut worst) = (0f32, 0usize);
        for (i, (a, b)) in ours.iter().zip(&r.data).enumerate() {
            let d = (a - b).abs();
            // NaN counts as the largest difference.
            if d > max_abs || (d.is_nan() && !max_abs.is_nan()) {
                max_abs = d;
                worst = i;
            }
        }
        let scale = r.data.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        nodes.push(NodeDiff {
            name: name.clone(),
            max_abs,
            relative: max_abs / scale,
            worst_token: worst / width,
            ours: Stats::of(&ours),
            reference: Stats::of(&r.data),
        });
    }
    let missing: Vec<String> = reference
        .nodes
        .iter()
        .filter(|n| !found.contains(n.name.as_str()))
        .map(|n| n.name.clone())
        .collect();
    if nodes.is_empty() {
        return Err(RuntimeError::Reference {
            path: "the reference".into(),
            message: format!(
                "none of its {} nodes is in this graph (first: {})",
                missing.len(),
                missing.first().map_or("none", String::as_str)
            ),
        });
    }
    Ok(Comparison {
        nodes,
        missing,
        tolerance,
    })
}
