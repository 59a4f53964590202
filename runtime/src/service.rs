//! The engine as a service: one thread owns a [`Scheduler`] over an [`Engine`] and
//! runs its batched steps; any number of callers on other threads (a server's
//! handlers, an agent's tools) submit requests and read their events from a
//! [`Stream`]. Dropping a stream cancels its sequence at the next step, so a client
//! that goes away stops costing anything.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::batch::{BatchOptions, Event, Scheduler, SeqId, SeqState};
use crate::engine::Engine;
use crate::error::{Result, RuntimeError};
use crate::generate::GenerateOptions;
use crate::prompt_cache::{CacheStats, DiskCache, DiskOptions};
use crate::speculate::Speculation;

/// Limits of a [`Service`].
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub batch: BatchOptions,
    /// Requests that may wait for admission; past it, `submit` answers
    /// [`RuntimeError::Busy`].
    pub max_queue: usize,
    /// How requests that do not say speculate (`None`: they do not).
    pub speculation: Option<Speculation>,
    /// A draft model for speculating sequences (same vocabulary, same device);
    /// without one they look drafts up in their context.
    pub draft: Option<Arc<Engine>>,
    /// The prefix cache's disk tier: a directory, its budget, and the model file
    /// that keys its entries.
    pub disk: Option<DiskOptions>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            batch: BatchOptions::default(),
            max_queue: 256,
            speculation: None,
            draft: None,
            disk: None,
        }
    }
}

/// What a service is doing, read without waiting for its thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceLoad {
    /// Sequences admitted and running.
    pub running: usize,
    /// Requests submitted and not yet admitted.
    pub waiting: usize,
}

/// Where the engine thread hands a request's events, in order; it answers whether
/// the caller still wants them (`false` cancels the request). Called on the engine
/// thread between steps, so it must not block: send to a channel.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

enum Command {
    Submit {
        prompt: Vec<u32>,
        opts: GenerateOptions,
        events: Sink,
        /// Raised when the caller drops its ticket.
        gone: Arc<AtomicBool>,
        accepted: Sender<Result<SeqId>>,
    },
}

/// Where a sequence's events go, and whether the caller is still there.
struct Route {
    seq: SeqId,
    events: Sink,
    gone: Arc<AtomicBool>,
}

#[derive(Default)]
struct Shared {
    running: AtomicUsize,
    waiting: AtomicUsize,
    /// Requests accepted and not yet ended.
    in_flight: AtomicUsize,
    stopping: AtomicBool,
    /// Raised to cancel every request in flight.
    cancel_all: AtomicBool,
}

/// One engine serving many callers.
pub struct Service {
    commands: Option<Sender<Command>>,
    shared: Arc<Shared>,
    cache_stats: Arc<CacheStats>,
    thread: Option<JoinHandle<()>>,
}

/// A submitted request: dropping it cancels the request at the next step.
#[derive(Debug)]
pub struct Ticket {
    seq: SeqId,
    gone: Arc<AtomicBool>,
}

impl Ticket {
    pub fn seq(&self) -> SeqId {
        self.seq
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Relaxed);
    }
}

/// The events of one request, in order, ending with `Done` or `Failed`. Dropping it
/// cancels the request.
pub struct Stream {
    ticket: Ticket,
    events: Receiver<Event>,
}

impl Stream {
    pub fn seq(&self) -> SeqId {
        self.ticket.seq
    }

    /// The next event; `None` once the request has ended and every event was read.
    pub fn next(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// The next event if one comes within `timeout`.
    pub fn next_timeout(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Iterator for Stream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        Stream::next(self)
    }
}

impl Service {
    /// Starts the engine's thread. The tokenizer is loaded there: events carry text
    /// and stop strings apply.
    pub fn start(engine: Arc<Engine>, opts: ServiceOptions) -> Result<Service> {
        let (commands, inbox) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let (ready_tx, ready) = mpsc::channel();
        let thread_shared = shared.clone();
        let batch = opts.batch.clone();
        let max_queue = opts.max_queue;
        let speculation = opts.speculation;
        let draft = opts.draft.clone();
        let disk = opts.disk.clone();
        let cache_stats = Arc::new(CacheStats::default());
        let thread_stats = cache_stats.clone();
        if let Some(d) = &draft {
            engine.check_draft(d)?;
        }
        let thread = std::thread::Builder::new()
            .name("llama-engine".into())
            .spawn(move || {
                let tokenizer = match engine.tokenizer() {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let scheduler = match Scheduler::new(&engine, batch) {
                    Ok(s) => {
                        let s = s
                            .with_tokenizer(&tokenizer)
                            .with_speculation(speculation)
                            .with_cache_stats(thread_stats.clone());
                        let s = match disk
                            .as_ref()
                            .and_then(|d| DiskCache::for_engine(&engine, d, thread_stats))
                        {
                            Some(d) => s.with_disk(d),
                            None => s,
                        };
                        match &draft {
                            Some(d) => s.with_draft(d.program(), d.context()),
                            None => s,
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                serve(scheduler, inbox, &thread_shared, max_queue);
            })
            .map_err(|e| RuntimeError::Options(format!("starting the engine thread: {e}")))?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(RuntimeError::Options(
                    "the engine thread ended while starting".into(),
                ))
            }
        }
        Ok(Service {
            commands: Some(commands),
            shared,
            cache_stats,
            thread: Some(thread),
        })
    }

    /// Submits a request; its events arrive on the returned stream. Refused at once
    /// when it could never run (see [`Scheduler::submit`]), when the queue is full, or
    /// while the service stops.
    pub fn submit(&self, prompt: Vec<u32>, opts: GenerateOptions) -> Result<Stream> {
        let (tx, events) = mpsc::channel();
        let ticket = self.submit_to(prompt, opts, Box::new(move |e| tx.send(e).is_ok()))?;
        Ok(Stream { ticket, events })
    }

    /// Submits a request whose events go to `sink` (see [`Sink`]), for callers that
    /// read them elsewhere than on a blocking thread (an async server). Dropping the
    /// ticket cancels the request. Refused as [`Service::submit`] is.
    pub fn submit_to(&self, prompt: Vec<u32>, opts: GenerateOptions, sink: Sink) -> Result<Ticket> {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Err(RuntimeError::Busy("the service is stopping".into()));
        }
        let events = sink;
        let (accepted, answer) = mpsc::channel();
        let gone = Arc::new(AtomicBool::new(false));
        let commands = self
            .commands
            .as_ref()
            .ok_or_else(|| RuntimeError::Busy("the service has stopped".into()))?;
        commands
            .send(Command::Submit {
                prompt,
                opts,
                events,
                gone: gone.clone(),
                accepted,
            })
            .map_err(|_| RuntimeError::Busy("the engine thread has ended".into()))?;
        let seq = answer
            .recv()
            .map_err(|_| RuntimeError::Busy("the engine thread has ended".into()))??;
        Ok(Ticket { seq, gone })
    }

    /// Running and waiting sequences, as of the last step.
    pub fn load(&self) -> ServiceLoad {
        ServiceLoad {
            running: self.shared.running.load(Ordering::Relaxed),
            waiting: self.shared.waiting.load(Ordering::Relaxed),
        }
    }

    /// Hits, misses and bytes of the prefix cache's tiers.
    pub fn cache_stats(&self) -> &CacheStats {
        &self.cache_stats
    }

    /// Stops taking requests and cancels every one in flight: each ends at the next
    /// step with what it generated so far.
    pub fn cancel_all(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.shared.cancel_all.store(true, Ordering::Relaxed);
    }

    /// Stops taking requests, lets the ones in flight finish for up to `deadline`
    /// (then cancels them), and ends the engine thread.
    pub fn shutdown(mut self, deadline: Duration) {
        self.stop(deadline);
    }

    fn stop(&mut self, deadline: Duration) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let start = Instant::now();
        while start.elapsed() < deadline && self.shared.in_flight.load(Ordering::Relaxed) > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Closing the channel ends the thread after it cancels what is left.
        self.commands = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(Duration::ZERO);
        }
    }
}

/// The engine thread: takes commands, steps while there is work, routes events.
fn serve(
    mut scheduler: Scheduler<'_>,
    inbox: Receiver<Command>,
    shared: &Shared,
    max_queue: usize,
) {
    let mut routes: Vec<Route> = Vec::new();
    let mut open = true;
    loop {
        // Idle: sleep until a command comes; busy: take what has arrived and step.
        if scheduler.is_idle() && open {
            match inbox.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => take(&mut scheduler, &mut routes, c, max_queue, shared),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        while open {
            match inbox.try_recv() {
                Ok(c) => take(&mut scheduler, &mut routes, c, max_queue, shared),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if !open || shared.cancel_all.load(Ordering::Relaxed) {
            // The service is going away: what is left is cancelled.
            for r in &routes {
                scheduler.cancel(r.seq);
            }
        }
        // A caller that dropped its stream has left: its sequence stops now.
        // (Its route stays until the cancellation's `Done`.)
        for r in &routes {
            if r.gone.load(Ordering::Relaxed) {
                scheduler.cancel(r.seq);
            }
        }
        for event in scheduler.step() {
            let seq = event.seq();
            let end = matches!(event, Event::Done { .. } | Event::Failed { .. });
            if let Some(i) = routes.iter().position(|r| r.seq == seq) {
                if !(routes[i].events)(event) {
                    scheduler.cancel(seq);
                }
                if end {
                    routes.swap_remove(i);
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        shared.running.store(scheduler.running(), Ordering::Relaxed);
        shared.waiting.store(scheduler.waiting(), Ordering::Relaxed);
        if !open && scheduler.is_idle() {
            return;
        }
    }
}

fn take(
    scheduler: &mut Scheduler<'_>,
    routes: &mut Vec<Route>,
    c: Command,
    max_queue: usize,
    shared: &Shared,
) {
    match c {
        Command::Submit {
            prompt,
            opts,
            events,
            gone,
            accepted,
        } => {
            // Admitted at once when there is room; otherwise it waits, if the queue
            // has a place for it.
            let answer = scheduler.submit(prompt, opts).and_then(|seq| {
                let waiting = scheduler.waiting();
                if scheduler.state(seq) == Some(SeqState::Waiting) && waiting > max_queue {
                    scheduler.cancel(seq);
                    return Err(RuntimeError::Busy(format!(
                        "{} requests are waiting (the queue holds {max_queue})",
                        waiting - 1
                    )));
                }
                Ok(seq)
            });
            if let Ok(seq) = &answer {
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                routes.push(Route {
                    seq: *seq,
                    events,
                    gone,
                });
            }
            let _ = accepted.send(answer);
        }
    }
}
