//! The engine as a service: callers on many threads share one batched engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use llama::runtime::{
    generate_ids, BatchOptions, Engine, Event, FinishReason, Precision, RuntimeError, Service,
    ServiceOptions, SessionOptions,
};

fn engine() -> Arc<Engine> {
    let options = SessionOptions {
        precision: Precision::F32,
        ..SessionOptions::default()
    };
    Arc::new(Engine::load(&fixture("llama3"), &options).expect("engine"))
}

/// Reads a stream to its end: the ids streamed, and how it finished.
fn collect(stream: llama::runtime::Stream) -> (Vec<u32>, FinishReason) {
    let mut streamed = Vec::new();
    for e in stream {
        match e {
            Event::Token { id, .. } => streamed.push(id),
            Event::Done { generation, .. } => {
                assert_eq!(streamed, generation.ids);
                return (streamed, generation.finish);
            }
            Event::Failed { error, .. } => panic!("failed: {error}"),
            Event::Text { .. } => {}
        }
    }
    panic!("the stream ended without Done");
}

#[test]
fn callers_on_many_threads_get_what_a_session_gives_alone() {
    let engine = engine();
    let service =
        Arc::new(Service::start(engine.clone(), ServiceOptions::default()).expect("start"));
    let handles: Vec<_> = (0..8u32)
        .map(|i| {
            let service = service.clone();
            std::thread::spawn(move || {
                let prompt = ids(3 + i as usize * 2, i);
                let got = collect(service.submit(prompt.clone(), greedy(10)).expect("submit"));
                (prompt, got)
            })
        })
        .collect();
    for h in handles {
        let (prompt, (got, _)) = h.join().expect("caller");
        let mut session = engine.session().expect("session");
        let want = generate_ids(&mut session, &prompt, &greedy(10), |_| true)
            .expect("alone")
            .ids;
        assert_eq!(got, want, "prompt {prompt:?}");
    }
    assert_eq!(service.load().running, 0);
}

#[test]
fn a_dropped_stream_stops_its_sequence_within_a_step() {
    let service = Service::start(engine(), ServiceOptions::default()).expect("start");
    let stream = service.submit(ids(4, 1), greedy(200)).expect("submit");
    let mut tokens = 0;
    while tokens < 2 {
        if let Some(Event::Token { .. }) = stream.next() {
            tokens += 1;
        }
    }
    drop(stream);
    let start = Instant::now();
    while service.load().running > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "still running a second later"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // The next request starts at once.
    let (ids_next, finish) = collect(service.submit(ids(4, 2), greedy(3)).expect("next"));
    assert_eq!((ids_next.len(), finish), (3, FinishReason::Length));
}

#[test]
fn a_full_queue_answers_busy_and_the_others_complete() {
    let options = ServiceOptions {
        batch: BatchOptions {
            max_sequences: 1,
            ..BatchOptions::default()
        },
        max_queue: 1,
        ..ServiceOptions::default()
    };
    let service = Service::start(engine(), options).expect("start");
    let a = service.submit(ids(4, 1), greedy(40)).expect("runs");
    let b = service.submit(ids(4, 2), greedy(5)).expect("waits");
    match service.submit(ids(4, 3), greedy(5)) {
        Err(RuntimeError::Busy(message)) => assert!(message.contains("queue"), "{message}"),
        Ok(_) => panic!("a third request was taken past the queue"),
        Err(e) => panic!("expected busy, got {e}"),
    }
    assert_eq!(collect(a).0.len(), 40);
    assert_eq!(collect(b).0.len(), 5);
}

#[test]
fn shutdown_lets_requests_in_flight_finish() {
    let service = Service::start(engine(), ServiceOptions::default()).expect("start");
    let stream = service.submit(ids(5, 4), greedy(20)).expect("submit");
    let reader = std::thread::spawn(move || collect(stream));
    service.shutdown(Duration::from_secs(30));
    let (got, finish) = reader.join().expect("reader");
    assert_eq!((got.len(), finish), (20, FinishReason::Length));
}

#[test]
fn bad_requests_are_refused_by_the_service() {
    let service = Service::start(engine(), ServiceOptions::default()).expect("start");
    assert!(matches!(
        service.submit(Vec::new(), greedy(4)),
        Err(RuntimeError::EmptyPrompt)
    ));
    assert!(matches!(
        service.submit(vec![1, 100_000], greedy(4)),
        Err(RuntimeError::TokenOutOfRange { .. })
    ));
    // And the service goes on.
    assert_eq!(
        collect(service.submit(ids(3, 1), greedy(2)).expect("ok"))
            .0
            .len(),
        2
    );
}
