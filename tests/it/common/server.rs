//! A `llama serve` in the test process, on loopback, over the real model, for the
//! server and embeddings tests.
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use llama::runtime::{
    generate, ChatTemplate, Context, Engine, GenerateOptions, Message, SessionOptions,
};
use llama::serve::ServerConfig;

use crate::common::real_model_path;

/// Positions per sequence in these tests: room for every prompt they send.
pub const CONTEXT: usize = 1024;

pub fn engine_options() -> SessionOptions {
    SessionOptions {
        context: Context::Positions(CONTEXT),
        ..SessionOptions::default()
    }
}

/// A server on its own thread and runtime; stopped (gracefully) on drop.
pub struct TestServer {
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl TestServer {
    /// Starts a server on the real model and waits until `/health` says it is ready.
    pub async fn start(config: ServerConfig) -> TestServer {
        Self::start_model(real_model_path(), engine_options(), config).await
    }

    /// Starts a server on the model at `path` and waits until it is ready.
    pub async fn start_model(
        path: std::path::PathBuf,
        options: SessionOptions,
        config: ServerConfig,
    ) -> TestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("address");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                llama::serve::serve(
                    listener,
                    config,
                    move || Engine::load(&path, &options),
                    async move {
                        let _ = rx.await;
                    },
                )
                .await
                .map_err(|e| e.to_string())
            })
        });
        let mut server = TestServer {
            base: format!("http://{addr}"),
            stop: Some(tx),
            thread: Some(thread),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(t) = self.thread.take_if(|t| t.is_finished()) {
                panic!("the server stopped while starting: {:?}", t.join());
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the server did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn shutdown(&mut self) -> Result<(), String> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the server thread panicked".to_string())?,
            None => Ok(()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A metric's value from `/metrics` (the sum over its label sets).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| {
                l.starts_with(name)
                    && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The engine alone, without the server, for the answers a request must equal.
pub fn reference_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(&real_model_path(), &engine_options()).expect("engine"))
}

/// Prompt ids of a conversation, as the model's chat template renders it.
pub fn chat_ids(messages: &[(&str, &str)]) -> Vec<u32> {
    let engine = reference_engine();
    let messages: Vec<Message> = messages.iter().map(|(r, c)| Message::new(r, c)).collect();
    let template: ChatTemplate = engine.chat_template().expect("template");
    let text = template.render(&messages, true).expect("render");
    engine
        .tokenizer()
        .expect("tokenizer")
        .encode_plain(&text)
        .expect("encode")
}

/// Greedy text after `prompt`, from one session alone.
pub fn greedy_alone(prompt: &[u32], max_tokens: usize) -> String {
    let engine = reference_engine();
    let tokenizer = engine.tokenizer().expect("tokenizer");
    let mut session = engine.session().expect("session");
    let opts = GenerateOptions {
        max_tokens,
        eos: engine.eos_token_ids(),
        ..GenerateOptions::default()
    };
    generate(&mut session, &tokenizer, prompt, &opts, |_| {})
        .expect("generate")
        .text
}
