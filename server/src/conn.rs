//! Connections with limits: how many are open at once, and how long a peer may take.
//!
//! Slow senders are the cheapest attack on an HTTP server: a client that sends a
//! header byte every few seconds, or a body slower than any real client, holds a
//! connection and its buffers for as long as it likes. hyper's own header deadline
//! needs a timer that `axum::serve` does not give it, so the limits live here, below
//! HTTP, on every accepted socket:
//!
//! - a request must arrive whole within the timeout: from the first byte read after
//!   the last byte written (or from the connection's start) until the server writes
//!   again, at most `timeout` may pass;
//! - an open connection on which nothing moves either way for `timeout` is closed
//!   (a client that stops reading a stream, a keep-alive connection left idle);
//! - past `max_connections` open connections, a new one is answered 503 and closed.
//!
//! A stream of tokens keeps its connection alive by writing; a request whose body is
//! cut off never reaches a handler, and a handler whose connection closes is dropped,
//! which cancels its sequences.
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// What an over-limit connection is told before it is closed.
fn busy() -> Vec<u8> {
    let body = crate::ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too many open connections; retry later",
    )
    .body()
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A TCP listener whose connections are [`Guarded`].
pub struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl LimitedListener {
    pub fn new(inner: TcpListener, max_connections: usize, timeout: Duration) -> Self {
        LimitedListener {
            inner,
            slots: Arc::new(Semaphore::new(max_connections)),
            timeout,
        }
    }
}

impl Listener for LimitedListener {
    type Io = Guarded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Guarded, std::net::SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => return (Guarded::new(stream, permit, self.timeout), addr),
                Err(_) => {
                    // Best effort, never blocking the accept loop: the socket's send
                    // buffer takes these few bytes at once or the peer goes without.
                    let _ = stream.try_write(&busy());
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection that holds one of the listener's slots while open and
/// fails its reads and writes once the peer takes too long (see the module's doc).
pub struct Guarded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    timeout: Duration,
    /// When the bytes being read began to arrive; `None` once the server has written.
    reading_since: Option<Instant>,
    deadline: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, timeout: Duration) -> Self {
        let now = Instant::now();
        Guarded {
            stream,
            _slot: slot,
            timeout,
            reading_since: Some(now),
            deadline: Box::pin(tokio::time::sleep_until(now + timeout)),
        }
    }

    fn read_some(&mut self) {
        let since = *self.reading_since.get_or_insert_with(Instant::now);
        self.deadline.as_mut().reset(since + self.timeout);
    }

    fn wrote_some(&mut self) {
        self.reading_since = None;
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }

    /// What a write to the socket comes to: bytes written restart the deadline, and a
    /// socket that cannot take any fails once the deadline has passed.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.wrote_some();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.check(cx).map(|r| r.map(|()| 0)),
        }
    }

    /// Called when the socket is not ready: an error once the deadline has passed.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took longer than the server's timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.read_some();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.check(cx),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Pending => this.check(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
