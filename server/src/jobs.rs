//! A request's sequences on the engine: submitted together, their events merged
//! into one channel tagged by choice, cancelled together when the request goes away.
use std::sync::Arc;
use std::time::Instant;

use llama_runtime::{Event, GenerateOptions, Generation, Ticket, TokenLogprob};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::error::ApiError;
use crate::models::Lease;
use crate::state::AppState;

/// One choice to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
}

/// What a choice's sequence did since it was last asked.
pub enum Update {
    /// Text that became final, and the token it came with (none for held-back
    /// text released at the end).
    Piece {
        text: String,
        token: Option<(u32, Option<TokenLogprob>)>,
    },
    Done(Generation),
    Failed(ApiError),
}

/// The running sequences of one request. Dropping it cancels them all.
pub struct Running {
    events: UnboundedReceiver<(usize, Event)>,
    _tickets: Vec<Ticket>,
    state: Arc<AppState>,
    /// The model, held (not unloaded) while the sequences run.
    model: Lease,
    arrived: Instant,
    first: bool,
    last_token: Vec<Option<Instant>>,
    open: usize,
}

impl Running {
    /// Submits every job (on a blocking thread: the engine answers between steps).
    /// If one is refused, those already submitted are cancelled.
    pub async fn start(
        state: Arc<AppState>,
        model: Lease,
        jobs: Vec<Job>,
        arrived: Instant,
        param: &'static str,
    ) -> Result<Running, ApiError> {
        let (tx, events) = unbounded_channel();
        let n = jobs.len();
        let m = model.clone();
        let tickets = tokio::task::spawn_blocking(move || {
            let service = m.service()?;
            let mut tickets = Vec::with_capacity(jobs.len());
            for (i, job) in jobs.into_iter().enumerate() {
                let tx = tx.clone();
                let sink = Box::new(move |e: Event| tx.send((i, e)).is_ok());
                let ticket = service
                    .submit_to(job.prompt, job.opts, sink)
                    .map_err(|e| ApiError::from_runtime(e, param))?;
                tickets.push(ticket);
            }
            Ok::<_, ApiError>(tickets)
        })
        .await
        .map_err(|e| {
            ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })??;
        Ok(Running {
            events,
            _tickets: tickets,
            state,
            model,
            arrived,
            first: true,
            last_token: vec![None; n],
            open: n,
        })
    }

    /// The model the sequences run on.
    pub fn model(&self) -> &Lease {
        &self.model
    }

    /// The next update of any choice, or `None` once every choice has ended.
    pub async fn next(&mut self) -> Option<(usize, Update)> {
        if self.open == 0 {
            return None;
        }
        let (i, event) = match self.events.recv().await {
            Some(x) => x,
            None => {
                self.open = 0;
                return None;
            }
        };
        let update = match event {
            Event::Token {
                id, text, logprob, ..
            } => {
                let now = Instant::now();
                if std::mem::take(&mut self.first) {
                    self.state
                        .metrics
                        .first_token(&self.model.name, now - self.arrived);
                }
                if let Some(Some(prev)) = self.last_token.get(i) {
                    self.state
                        .metrics
                        .between_tokens(&self.model.name, now - *prev);
                }
                if let Some(slot) = self.last_token.get_mut(i) {
                    *slot = Some(now);
                }
                Update::Piece {
                    text,
                    token: Some((id, logprob)),
                }
            }
            Event::Text { text, .. } => Update::Piece { text, token: None },
            Event::Done { generation, .. } => {
                self.open -= 1;
                self.state.metrics.tokens(
                    &self.model.name,
                    generation.prompt_tokens,
                    generation.cached_tokens,
                    generation.ids.len(),
                );
                self.state.metrics.drafts(
                    &self.model.name,
                    generation.drafted,
                    generation.accepted,
                );
                Update::Done(generation)
            }
            Event::Failed { error, .. } => {
                self.open -= 1;
                Update::Failed(ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("generation failed: {error}"),
                ))
            }
        };
        Some((i, update))
    }
}
