//! The graph container: nodes in topological order, named outputs, stored parameters.
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use crate::error::{GraphError, Result};
use crate::ir::{DType, Dim, Node, NodeId, Op, ParamKind, Shape};
use crate::shape;
use crate::value::Value;

/// A model's forward pass as a graph of named ops.
///
/// Nodes are kept in a topological order (every input precedes its user). Parameter
/// nodes (weights and folded constants) have their values stored here, keyed by name.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    nodes: Vec<Node>,
    outputs: Vec<NodeId>,
    params: BTreeMap<String, Value>,
    index: HashMap<String, NodeId>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn outputs(&self) -> &[NodeId] {
        &self.outputs
    }

    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.index.get(name).copied()
    }

    pub fn param(&self, name: &str) -> Option<&Value> {
        self.params.get(name)
    }

    /// Number of parameter elements held by the graph.
    pub fn param_elements(&self) -> usize {
        self.params
            .values()
            .map(|v| v.dims().iter().product::<usize>())
            .sum()
    }

    fn push(&mut self, node: Node) -> Result<NodeId> {
        if self.index.contains_key(&node.name) {
            return Err(GraphError::DuplicateName(node.name));
        }
        let id = NodeId(self.nodes.len());
        self.index.insert(node.name.clone(), id);
        self.nodes.push(node);
        Ok(id)
    }

    /// The token-id input of a step: `[tokens]`.
    pub fn add_tokens(&mut self, name: &str) -> Result<NodeId> {
        self.push(Node {
            name: name.to_string(),
            op: Op::Tokens,
            inputs: vec![],
            shape: Shape(vec![Dim::Seq]),
            dtype: DType::I64,
        })
    }

    /// A stored value (weight or folded constant) as a node.
    pub fn add_param(&mut self, name: &str, kind: ParamKind, value: Value) -> Result<NodeId> {
        let node = Node {
            name: name.to_string(),
            op: Op::Param(kind),
            inputs: vec![],
            shape: Shape::fixed(&value.dims()),
            dtype: value.dtype(),
        };
        let id = self.push(node)?;
        self.params.insert(name.to_string(), value);
        Ok(id)
    }

    /// Adds an op node, inferring its shape; a mismatch names the node and both shapes.
    pub fn add(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let ins: Vec<(Shape, DType)> = inputs
            .iter()
            .map(|i| (self.nodes[i.0].shape.clone(), self.nodes[i.0].dtype))
            .collect();
        let (shape, dtype) = shape::infer(name, &op, &ins)?;
        self.push(Node {
            name: name.to_string(),
            op,
            inputs: inputs.to_vec(),
            shape,
            dtype,
        })
    }

    pub fn set_outputs(&mut self, outputs: Vec<NodeId>) {
        self.outputs = outputs;
    }

    /// For each node, the nodes that read it.
    pub fn users(&self) -> Vec<Vec<NodeId>> {
        let mut users = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for inp in &n.inputs {
                users[inp.0].push(NodeId(i));
            }
        }
        users
    }

    /// Gives a node a new, unused name (its stored value moves with it).
    pub fn rename(&mut self, id: NodeId, name: &str) -> Result<()> {
        if self.index.contains_key(name) {
            return Err(GraphError::DuplicateName(name.to_string()));
        }
        let old = std::mem::replace(&mut self.nodes[id.0].name, name.to_string());
        self.index.remove(&old);
        self.index.insert(name.to_string(), id);
        if let Some(v) = self.params.remove(&old) {
            self.params.insert(name.to_string(), v);
        }
        Ok(())
    }

    /// Makes every reader of `old` (and the outputs) read `new` instead.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        for n in &mut self.nodes {
            for inp in &mut n.inputs {
                if *inp == old {
                    *inp = new;
                }
            }
        }
        for o in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Points input `index` of `node` at `input` (the caller keeps shapes consistent;
    /// [`Graph::validate`] checks).
    pub fn set_input(&mut self, node: NodeId, index: usize, input: NodeId) {
        self.nodes[node.0].inputs[index] = input;
    }

    pub(crate) fn replace_param_value(&mut self, name: &str, value: Value) {
        self.params.insert(name.to_string(), value);
    }

    /// Turns a node into a stored constant (constant folding).
    pub fn make_constant(&mut self, id: NodeId, value: Value) {
        let node = &mut self.nodes[id.0];
        node.op = Op::Param(ParamKind::Folded);
        node.inputs.clear();
        self.params.insert(node.name.clone(), value);
    }

    /// Keeps the nodes marked in `keep`, in a stable topological order where every node
    /// sits just before the first node that needs it (so a weight or a node added by a
    /// pass appears next to its use), and drops the parameters of the rest.
    pub fn retain(&mut self, keep: &[bool]) {
        let n = self.nodes.len();
        let users = self.users();
        let kahn = |key: &[usize]| {
            // Kahn's algorithm, always taking the ready node of smallest (key, index).
            let mut pending: Vec<usize> = self
                .nodes
                .iter()
                .map(|node| node.inputs.iter().filter(|x| keep[x.0]).count())
                .collect();
            let mut ready: BinaryHeap<std::cmp::Reverse<(usize, usize)>> = (0..n)
                .filter(|&i| keep[i] && pending[i] == 0)
                .map(|i| std::cmp::Reverse((key[i], i)))
                .collect();
            let mut order = Vec::with_capacity(n);
            while let Some(std::cmp::Reverse((_, i))) = ready.pop() {
                order.push(i);
                for u in &users[i] {
                    if keep[u.0] {
                        pending[u.0] -= 1;
                        if pending[u.0] == 0 {
                            ready.push(std::cmp::Reverse((key[u.0], u.0)));
                        }
                    }
                }
            }
            order
        };
        let first = kahn(&(0..n).collect::<Vec<_>>());
        // A node's key: the earliest position among itself and everything downstream;
        // a source (weight, input) takes its first user's, wherever it was declared.
        let mut key: Vec<usize> = (0..n).collect();
        for &i in first.iter().rev() {
            let downstream = users[i]
                .iter()
                .filter(|u| keep[u.0])
                .map(|u| key[u.0])
                .min();
            key[i] = match downstream {
                Some(d) if self.nodes[i].inputs.is_empty() => d,
                Some(d) => key[i].min(d),
                None => key[i],
            };
        }
        let order = kahn(&key);
        let mut remap = vec![None; n];
        for (new, &old) in order.iter().enumerate() {
            remap[old] = Some(NodeId(new));
        }
        let mut old_nodes: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        for (i, slot) in old_nodes.iter().enumerate() {
            if remap[i].is_none() {
                if let Some(node) = slot {
                    self.params.remove(&node.name);
                }
            }
        }
        self.nodes = order
            .iter()
            .filter_map(|&i| old_nodes[i].take())
            .map(|mut node| {
                for inp in &mut node.inputs {
                    // Inputs of kept nodes are kept: `keep` is closed under inputs.
                    *inp = remap[inp.0].unwrap_or(*inp);
                }
                node
            })
            .collect();
        self.outputs = self.outputs.iter().filter_map(|o| remap[o.0]).collect();
        self.index = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), NodeId(i)))
            .collect();
    }

    /// Restores topological order after a pass appended nodes.
    pub fn sort(&mut self) {
        let keep = vec![true; self.nodes.len()];
        self.retain(&keep);
    }

    /// Checks that every input precedes its user and every shape still infers.
    pub fn validate(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(bad) = node.inputs.iter().find(|x| x.0 >= i) {
                return Err(GraphError::Invalid {
                    node: node.name.clone(),
                    message: format!("input `{}` does not precede it", self.nodes[bad.0].name),
                });
            }
            match node.op {
                Op::Tokens => {}
                Op::Param(_) => {
                    let value = self
                        .params
                        .get(&node.name)
                        .ok_or_else(|| GraphError::MissingParam(node.name.clone()))?;
                    if Shape::fixed(&value.dims()) != node.shape {
                        return Err(GraphError::Shape {
                            node: node.name.clone(),
                            what: "stored value".into(),
                            expected: node.shape.to_string(),
                            actual: Shape::fixed(&value.dims()),
                        });
                    }
                }
                _ => {
                    let ins: Vec<(Shape, DType)> = node
                        .inputs
                        .iter()
                        .map(|x| (self.nodes[x.0].shape.clone(), self.nodes[x.0].dtype))
                        .collect();
                    let (shape, _) = shape::infer(&node.name, &node.op, &ins)?;
                    if shape != node.shape {
                        return Err(GraphError::Shape {
                            node: node.name.clone(),
                            what: "recorded shape".into(),
                            expected: node.shape.to_string(),
                            actual: shape,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}
