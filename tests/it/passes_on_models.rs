//! Every pass keeps every tiny model's outputs: execute, optimize, execute, compare.

use crate::common::*;
use llama::graph::{Pass, PassContext, Pipeline};

fn logits_after(name: &str, passes: Vec<Box<dyn Pass>>) -> Vec<Vec<f32>> {
    let device = flex();
    let mut g = graph(name, &device, &Pipeline::none());
    Pipeline::from_passes(passes)
        .run(
            &mut g,
            &PassContext {
                device: device.clone(),
            },
        )
        .expect("passes run");
    let mut s = session_of(g, &device, 64);
    full_forward(&mut s, &reference(name).input_ids)
}

#[test]
fn each_pass_alone_keeps_the_outputs() {
    for name in TINY {
        let before = logits_after(name, vec![]);
        // quantize-weights is lossy by design; its bounds are tested on its own.
        for pass in Pipeline::NAMES.iter().filter(|p| **p != "quantize-weights") {
            let after = logits_after(name, vec![Pipeline::by_name(pass).expect("known pass")]);
            for (pos, (a, b)) in before.iter().zip(&after).enumerate() {
                let diff = max_abs_diff(a, b);
                assert!(
                    diff <= 1e-5,
                    "{name}: pass {pass} changed position {pos} by {diff}"
                );
            }
        }
    }
}

#[test]
fn the_standard_pipeline_keeps_the_outputs_and_does_its_work() {
    let device = flex();
    for name in TINY {
        let before = logits_after(name, vec![]);
        let mut g = graph(name, &device, &Pipeline::none());
        let report = Pipeline::standard()
            .run(
                &mut g,
                &PassContext {
                    device: device.clone(),
                },
            )
            .expect("pipeline");
        let count = |pass: &str| {
            report
                .iter()
                .find(|(n, _)| *n == pass)
                .map_or(0, |(_, c)| *c)
        };
        let config: serde_json::Value = read_json(&fixture(name).join("config.json"));
        let layers = config["num_hidden_layers"].as_u64().expect("layers") as usize;
        // Q/K/V and gate/up in each layer.
        assert_eq!(count("fuse-matmul"), 2 * layers, "{name}: {report:?}");
        assert!(
            count("constant-fold") >= 3 + 2 * layers,
            "{name}: rope tables and fused weights fold: {report:?}"
        );
        assert!(count("dead-nodes") > 0, "{name}: {report:?}");
        for l in 0..layers {
            for fused in ["attn_qkv", "ffn_gate_up"] {
                assert!(
                    g.find(&format!("blk.{l}.{fused}")).is_some(),
                    "{name}: blk.{l}.{fused} exists"
                );
            }
            assert!(
                g.find(&format!("blk.{l}.attn_q.weight")).is_none(),
                "{name}: unfused weights are gone"
            );
        }
        let mut s = session_of(g, &device, 64);
        let after = full_forward(&mut s, &reference(name).input_ids);
        for (a, b) in before.iter().zip(&after) {
            assert!(max_abs_diff(a, b) <= 1e-5);
        }
    }
}
