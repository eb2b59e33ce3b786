//! The accept loop and the connections it serves. What keeps the API up whatever clients do:
//!
//! - at most [`Limits::max_connections`] connections are served at once; one beyond them is
//!   accepted, answered 503 (a JSON fault, `Connection: close`) and closed at once, so no
//!   number of clients can hold more descriptors than the cap;
//! - a connection must deliver a whole request head within [`Limits::header_timeout`] of
//!   opening, or of the first byte of a later request, and may stay idle between requests for
//!   [`Limits::idle_timeout`]; past either it is closed without an answer;
//! - a request body must arrive within [`Limits::body_timeout`] (408, see `body.rs`);
//! - `accept()` failing never stops the loop: running out of descriptors (EMFILE, ENFILE) or
//!   memory backs off for [`Limits::accept_backoff`] and tries again, and the failures are
//!   logged at most once a second with a count of those not shown;
//! - if the loop itself ever panicked, the thread logs it and serves again on a fresh runtime
//!   a second later (the VM runs on threads of its own and never notices).

use crate::Limits;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore};

/// Largest request head (request line and headers) hyper buffers; beyond it the answer is
/// 431. hyper's smallest allowed value is 8 KiB.
const MAX_HEAD: usize = 16 * 1024;

/// Serves `listener` for as long as the process lives. `runtime` is the first runtime; after a
/// failure or a panic the loop starts again on a new one.
pub(crate) fn run(
    first: tokio::runtime::Runtime,
    listener: std::os::unix::net::UnixListener,
    app: Router,
    limits: Limits,
    shown: String,
) {
    let mut runtime = Some(first);
    loop {
        let rt = match runtime.take().map_or_else(build_runtime, Ok) {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(
                    "api socket {shown}: cannot start the server: {e}; retrying in 1 s"
                );
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let listener = listener.try_clone()?;
            rt.block_on(async {
                let listener = UnixListener::from_std(listener)?;
                accept_loop(listener, app.clone(), limits).await
            })
        }));
        match outcome {
            Ok(Err(e)) => {
                tracing::error!("api socket {shown}: {e}; serving again in 1 s");
            }
            Ok(Ok(never)) => match never {},
            Err(_) => {
                tracing::error!("api socket {shown}: the server panicked; serving again in 1 s");
            }
        }
        drop(rt);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The API's runtime: one thread, I/O and timers, a small pool for chain edits.
pub(crate) fn build_runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(2)
        .thread_name("api-edit")
        .build()
}

/// Accepts until the process ends; only a panic leaves it.
async fn accept_loop(
    listener: UnixListener,
    app: Router,
    limits: Limits,
) -> io::Result<std::convert::Infallible> {
    let cap = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(cap));
    let busy = busy_answer(cap);
    let mut failures = Throttle::new(Duration::from_secs(1));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if let Some(failed) = failures.recovered() {
                    tracing::warn!(
                        "api: accepting connections again after {failed} failed accepts"
                    );
                }
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let app = app.clone();
                        tokio::spawn(async move {
                            connection(stream, app, limits).await;
                            drop(slot);
                        });
                    }
                    Err(_) => refuse(stream, &busy),
                }
            }
            // The client gave up before we took its connection, or a signal: nothing wrong
            // with the listener.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                ) => {}
            // EMFILE, ENFILE, ENOBUFS, ENOMEM and anything else: the pending connection stays
            // queued; try again once some descriptors or memory may be free.
            Err(e) => {
                if let Some(hidden) = failures.failed(Instant::now()) {
                    let more = if hidden > 0 {
                        format!(" ({hidden} more failures since the last report)")
                    } else {
                        String::new()
                    };
                    tracing::error!(
                        "api: accept failed: {e}{more}; retrying every {} ms",
                        limits.accept_backoff.as_millis()
                    );
                }
                tokio::time::sleep(limits.accept_backoff).await;
            }
        }
    }
}

fn busy_answer(cap: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "fault_message": format!(
            "the API serves at most {cap} connections at once; close an idle one and retry"
        )
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A connection over the cap: the 503 goes out at once and the descriptor is closed; nothing
/// here waits on the client.
fn refuse(stream: UnixStream, answer: &[u8]) {
    use std::io::{Read, Write};
    let Ok(stream) = stream.into_std() else {
        return;
    };
    // Whatever part of the request has already arrived is read (without waiting), so the
    // close does not turn into a reset before the client has read the answer.
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        match (&stream).read(&mut scratch) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = (&stream).write(answer);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Where a connection is between requests.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// No byte of the next request yet: since the connection opened (`first`) or since the
    /// last answer.
    Waiting { since: Instant, first: bool },
    /// Part of a request head has arrived.
    Head { since: Instant },
    /// A request is being handled (its body read by the handler, under its own timeout).
    Busy,
}

struct Watch {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Watch {
    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
        self.changed.notify_one();
    }

    /// Bytes came in: a wait for the next request turns into reading its head.
    fn arrived(&self) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        if let Phase::Waiting { .. } = *phase {
            *phase = Phase::Head {
                since: Instant::now(),
            };
            self.changed.notify_one();
        }
    }

    /// When the connection is to be closed if nothing changes (`None` while busy).
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        match *self.phase.lock().unwrap_or_else(PoisonError::into_inner) {
            Phase::Waiting { since, first: true } | Phase::Head { since } => {
                since.checked_add(limits.header_timeout)
            }
            Phase::Waiting {
                since,
                first: false,
            } => since.checked_add(limits.idle_timeout),
            Phase::Busy => None,
        }
    }
}

/// The socket as hyper sees it, telling the watch when bytes arrive.
struct Watched {
    io: UnixStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.arrived();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves one connection until the client closes it, hyper ends it (a malformed request,
/// `Connection: close`) or a timeout closes it.
async fn connection(stream: UnixStream, app: Router, limits: Limits) {
    let watch = Arc::new(Watch {
        phase: Mutex::new(Phase::Waiting {
            since: Instant::now(),
            first: true,
        }),
        changed: Notify::new(),
    });
    let io = TokioIo::new(Watched {
        io: stream,
        watch: watch.clone(),
    });
    let service_watch = watch.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut app = app.clone();
        let watch = service_watch.clone();
        watch.set(Phase::Busy);
        async move {
            let answer = tower_service::Service::call(&mut app, request).await;
            // The answer is written from here on: a client that does not read it is closed
            // after the idle timeout like one that sends nothing.
            watch.set(Phase::Waiting {
                since: Instant::now(),
                first: false,
            });
            answer
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The header timeout is ours (above): hyper's would also cut idle keep-alives.
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    loop {
        let deadline = watch.deadline(&limits);
        let timer = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!("api: connection ended: {e}");
                }
                return;
            }
            _ = watch.changed.notified() => {}
            _ = timer => {
                if watch.deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!("api: closing a connection that sent no request in time");
                    return;
                }
            }
        }
    }
}

/// Rate-limits the accept loop's error lines: at most one per `every`, each with the number
/// of failures not shown since the previous one.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: Duration,
    last: Option<Instant>,
    hidden: u64,
    /// Failures since the last successful accept.
    failing: u64,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            hidden: 0,
            failing: 0,
        }
    }

    /// A failure at `now`: `Some(failures not shown since the last line)` when a line may be
    /// written, `None` when this one is to be counted silently.
    pub(crate) fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failing += 1;
        let due = self
            .last
            .is_none_or(|l| now.saturating_duration_since(l) >= self.every);
        if due {
            self.last = Some(now);
            Some(std::mem::take(&mut self.hidden))
        } else {
            self.hidden += 1;
            None
        }
    }

    /// An accept succeeded: `Some(failures in the run)` if it ends a run of failures.
    pub(crate) fn recovered(&mut self) -> Option<u64> {
        if self.failing == 0 {
            return None;
        }
        self.hidden = 0;
        self.last = None;
        Some(std::mem::take(&mut self.failing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_are_logged_once_a_second_with_the_count_not_shown() {
        let mut t = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(t.recovered(), None, "nothing failed yet");
        assert_eq!(t.failed(t0), Some(0));
        for i in 1..=99 {
            assert_eq!(t.failed(t0 + Duration::from_millis(i * 10 - 5)), None);
        }
        assert_eq!(t.failed(t0 + Duration::from_millis(1000)), Some(99));
        assert_eq!(t.failed(t0 + Duration::from_millis(1001)), None);
        assert_eq!(t.recovered(), Some(102));
        assert_eq!(t.recovered(), None);
        assert_eq!(
            t.failed(t0 + Duration::from_millis(1002)),
            Some(0),
            "a new run"
        );
    }

    #[test]
    fn the_busy_answer_is_a_complete_http_answer_with_a_json_fault() {
        let raw = String::from_utf8(busy_answer(64)).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["fault_message"].as_str().unwrap().contains("64"));
    }
}
