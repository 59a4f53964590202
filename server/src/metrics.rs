//! The server's Prometheus metrics. Each server owns its recorder (nothing is
//! installed process-wide), so several servers in one process count apart.
use std::time::Duration;

use llama_runtime::ServiceLoad;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

const META: Metadata<'static> = Metadata::new("llama_serve", Level::INFO, None);

/// Latency buckets, in seconds: from one fast decode step to a long prefill.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Counters and histograms of generation carry a `model` label; the request
/// counters and the in-flight gauge are the server's.
pub struct Metrics {
    recorder: PrometheusRecorder,
    in_flight: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        let builder =
            match builder.set_buckets_for_metric(Matcher::Suffix("seconds".into()), BUCKETS) {
                Ok(b) => b,
                // Only an empty bucket list is refused; ours is not.
                Err(_) => PrometheusBuilder::new(),
            };
        let recorder = builder.build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, text: &'static str| {
            recorder.describe_counter(name.into(), unit, text.into());
        };
        describe(
            "llama_requests_total",
            None,
            "HTTP requests answered, by route and status",
        );
        describe(
            "llama_prompt_tokens_total",
            Some(Unit::Count),
            "prompt tokens of finished requests",
        );
        describe(
            "llama_prompt_tokens_cached_total",
            Some(Unit::Count),
            "prompt tokens taken from the prefix cache instead of run",
        );
        describe(
            "llama_generated_tokens_total",
            Some(Unit::Count),
            "tokens generated",
        );
        describe(
            "llama_draft_tokens_total",
            Some(Unit::Count),
            "speculative draft tokens verified",
        );
        describe(
            "llama_draft_tokens_accepted_total",
            Some(Unit::Count),
            "speculative draft tokens accepted",
        );
        recorder.describe_histogram(
            "llama_time_to_first_token_seconds".into(),
            Some(Unit::Seconds),
            "from a request's arrival to its first generated token".into(),
        );
        recorder.describe_histogram(
            "llama_inter_token_latency_seconds".into(),
            Some(Unit::Seconds),
            "between consecutive tokens of one sequence".into(),
        );
        recorder.describe_gauge(
            "llama_queue_depth".into(),
            None,
            "requests waiting for room in the KV budget".into(),
        );
        recorder.describe_gauge(
            "llama_busy_sequences".into(),
            None,
            "sequences prefilling or decoding".into(),
        );
        recorder.describe_gauge(
            "llama_requests_in_flight".into(),
            None,
            "requests being answered".into(),
        );
        let in_flight = recorder.register_gauge(&Key::from_name("llama_requests_in_flight"), &META);
        Metrics {
            in_flight,
            recorder,
        }
    }

    fn key(name: &'static str, model: &str) -> Key {
        Key::from_parts(name, vec![Label::new("model", model.to_string())])
    }

    fn counter(&self, name: &'static str, model: &str) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, model), &META)
    }

    fn histogram(&self, name: &'static str, model: &str) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, model), &META)
    }

    fn gauge(&self, name: &'static str, model: &str) -> Gauge {
        self.recorder.register_gauge(&Self::key(name, model), &META)
    }

    pub fn request(&self, route: &str, status: u16) {
        let key = Key::from_parts(
            "llama_requests_total",
            vec![
                Label::new("route", route.to_string()),
                Label::new("status", status.to_string()),
            ],
        );
        self.recorder.register_counter(&key, &META).increment(1);
    }

    pub fn tokens(&self, model: &str, prompt: usize, cached: usize, generated: usize) {
        self.counter("llama_prompt_tokens_total", model)
            .increment(prompt as u64);
        self.counter("llama_prompt_tokens_cached_total", model)
            .increment(cached as u64);
        self.counter("llama_generated_tokens_total", model)
            .increment(generated as u64);
    }

    /// Speculative draft tokens of a finished request: verified, and accepted.
    pub fn drafts(&self, model: &str, drafted: usize, accepted: usize) {
        self.counter("llama_draft_tokens_total", model)
            .increment(drafted as u64);
        self.counter("llama_draft_tokens_accepted_total", model)
            .increment(accepted as u64);
    }

    pub fn first_token(&self, model: &str, after: Duration) {
        self.histogram("llama_time_to_first_token_seconds", model)
            .record(after.as_secs_f64());
    }

    pub fn between_tokens(&self, model: &str, gap: Duration) {
        self.histogram("llama_inter_token_latency_seconds", model)
            .record(gap.as_secs_f64());
    }

    pub fn in_flight(&self, delta: f64) {
        self.in_flight.increment(delta);
    }

    /// The text exposition, with each loaded model's engine load as of now.
    pub fn render(&self, loads: &[(String, ServiceLoad)]) -> String {
        for (model, load) in loads {
            self.gauge("llama_queue_depth", model)
                .set(load.waiting as f64);
            self.gauge("llama_busy_sequences", model)
                .set(load.running as f64);
        }
        self.recorder.handle().render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
