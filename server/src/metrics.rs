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

    /// The text exposition, with each loaded model's engine load and prefix-cache
    /// tiers as of now.
    pub fn render(&self, loads: &[(String, ServiceLoad, &llama_runtime::CacheStats)]) -> String {
        for (model, load, _) in loads {
            self.gauge("llama_queue_depth", model)
                .set(load.waiting as f64);
            self.gauge("llama_busy_sequences", model)
                .set(load.running as f64);
        }
        let mut out = self.recorder.handle().render();
        let caches: Vec<(&str, &llama_runtime::CacheStats)> =
            loads.iter().map(|(m, _, c)| (m.as_str(), *c)).collect();
        out.push_str(&cache_tiers(&caches));
        out
    }
}

/// The prefix cache's tiers in the exposition format: hits, misses and bytes held,
/// by tier (`ram`, `disk`), and bytes moved to and from disk.
/// The prefix cache's tiers of every model, labelled by model (and tier).
fn cache_tiers(caches: &[(&str, &llama_runtime::CacheStats)]) -> String {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    if caches.is_empty() {
        return out;
    }
    let mut family =
        |name: &str,
         kind: &str,
         help: &str,
         rows: &dyn Fn(&llama_runtime::CacheStats) -> Vec<(&'static str, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (model, c) in caches {
                // A label value escapes backslashes, quotes and newlines.
                let model = model
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                for (tier, value) in rows(c) {
                    let tier = if tier.is_empty() {
                        String::new()
                    } else {
                        format!(",tier=\"{tier}\"")
                    };
                    let _ = writeln!(out, "{name}{{model=\"{model}\"{tier}}} {value}");
                }
            }
        };
    family(
        "llama_prompt_cache_hits_total",
        "counter",
        "admitted requests that started from a cached prefix, by tier",
        &|c| {
            vec![
                ("ram", c.ram_hits.load(Relaxed)),
                ("disk", c.disk_hits.load(Relaxed)),
            ]
        },
    );
    family(
        "llama_prompt_cache_misses_total",
        "counter",
        "admitted requests that a tier had no prefix for (disk: asked after a RAM miss)",
        &|c| {
            vec![
                ("ram", c.ram_misses.load(Relaxed)),
                ("disk", c.disk_misses.load(Relaxed)),
            ]
        },
    );
    family(
        "llama_prompt_cache_bytes",
        "gauge",
        "bytes each tier holds",
        &|c| {
            vec![
                ("ram", c.ram_bytes.load(Relaxed)),
                ("disk", c.disk_bytes.load(Relaxed)),
            ]
        },
    );
    family(
        "llama_prompt_cache_disk_written_bytes_total",
        "counter",
        "bytes of entries written to the disk tier",
        &|c| vec![("", c.disk_written.load(Relaxed))],
    );
    family(
        "llama_prompt_cache_disk_read_bytes_total",
        "counter",
        "bytes of KV rows read back from the disk tier",
        &|c| vec![("", c.disk_read.load(Relaxed))],
    );
    family(
        "llama_prompt_cache_disk_skipped_total",
        "counter",
        "disk entries skipped as truncated, corrupted or made under another key",
        &|c| vec![("", c.disk_skipped.load(Relaxed))],
    );
    family(
        "llama_prompt_cache_disk_enabled",
        "gauge",
        "1 while the disk tier is in use, 0 without one or after it failed",
        &|c| vec![("", u64::from(c.disk_enabled.load(Relaxed)))],
    );
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
