//! The KV budget over time: a thousand sequences come and go through one scheduler
//! and leave nothing behind. Alone in its test binary, so that the resident memory it
//! reads is its own.
#[path = "it/common/mod.rs"]
mod common;

use crate::common::*;
use llama::graph::{KvType, Pipeline, Program};
use llama::runtime::{BatchOptions, Event, Scheduler};

/// Runs the scheduler to the end; the number of sequences that finished.
fn drain(s: &mut Scheduler<'_>) -> usize {
    let mut done = 0;
    s.run(|e| match e {
        Event::Done { .. } => done += 1,
        Event::Failed { seq, error } => panic!("sequence {seq} failed: {error}"),
        _ => {}
    });
    done
}

#[test]
fn a_thousand_sequences_come_and_go_without_leaking() {
    let device = flex();
    let p = Program::new(
        graph("llama3", &device, &Pipeline::standard()),
        device.clone(),
    )
    .expect("program");
    let opts = BatchOptions {
        kv_budget: 200,
        max_sequences: 16,
        ..BatchOptions::default()
    };
    let mut s = Scheduler::for_program(&p, 64, KvType::F32, opts).expect("scheduler");
    let round = |s: &mut Scheduler<'_>, from: u32| {
        for i in from..from + 100 {
            s.submit(ids(3 + (i as usize % 20), i), greedy(1 + i as usize % 5))
                .expect("submit");
        }
        assert_eq!(drain(s), 100);
        assert!(s.kv_used() <= 200);
    };
    round(&mut s, 0);
    let before = rss_kib();
    for r in 1..10 {
        round(&mut s, r * 100);
    }
    let grown = rss_kib().saturating_sub(before);
    assert_eq!(s.running() + s.waiting(), 0);
    assert_eq!(s.kv_used(), s.prefix_positions());
    s.clear_prefixes();
    assert_eq!(s.kv_used(), 0);
    assert!(
        grown < 32 * 1024,
        "resident memory grew {grown} KiB over 900 sequences"
    );
}
