//! Serving the routers of this crate with the guards `axum::serve` leaves out: a time limit on
//! a request's headers (and on a kept-alive connection's wait for its next request) and a cap
//! on the connections served at once.
//!
//! Invariant: a connection is accepted only while it holds one of `max_connections` slots, and
//! gives its slot back when it ends, whether it ended well or not. At the cap, connections wait
//! in the kernel's listen queue, not in this process: a flood of them cannot take the file
//! descriptors the runtime's store needs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How [`serve`] guards its listener against clients that hold connections open.
///
/// ```
/// let opts = loom_http::ServeOptions {
///     max_connections: 256,
///     ..loom_http::ServeOptions::default()
/// };
/// assert_eq!(opts.header_timeout, std::time::Duration::from_secs(30));
/// ```
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Longest a client may take to send a request's headers, from when the connection opens
    /// or its last answer went out (default 30 s). The connection is closed after it, so a
    /// client trickling headers (slowloris), or keeping a connection idle, holds it no longer.
    /// A request's body has its own limit ([`Options::body_timeout`](crate::Options)).
    pub header_timeout: Duration,
    /// Most connections served at once (default 1 024; 0 counts as 1). Further connections
    /// wait in the kernel's listen queue until one closes, so that a flood of connections
    /// cannot take every file descriptor the process, and its store, needs.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` completes, then stops accepting,
/// lets each connection finish the request it is answering, and returns once all have closed.
///
/// Use it in place of `axum::serve` for an ingress that clients you do not control reach:
/// see [`ServeOptions`]. An error accepting a connection is logged; one that is the process's
/// own (out of file descriptors) pauses accepting for a second, as `axum::serve` does.
///
/// ```no_run
/// # async fn run(rt: loom_core::runtime::Runtime) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// let app = loom_http::router(rt, loom_http::Options::default());
/// let ctrl_c = async {
///     // Until Ctrl-C, or for ever if it cannot be listened for.
///     if tokio::signal::ctrl_c().await.is_err() {
///         std::future::pending::<()>().await;
///     }
/// };
/// loom_http::serve(listener, app, loom_http::ServeOptions::default(), ctrl_c).await;
/// # Ok(()) }
/// ```
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) {
    let slots = Arc::new(Semaphore::new(
        opts.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A slot before the accept: at the cap, connections wait in the kernel's queue.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                // Never closed: this function holds the semaphore and closes it nowhere.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // An answer goes out at once, not held back for the client's acknowledgement of the
        // last one (Nagle's algorithm); a socket that refuses is served all the same.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client gone, a header read timed out: the connection's end, nothing to answer.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed");
            }
            drop(slot);
        });
    }
    // Connections still in the kernel's queue are refused from here on.
    drop(listener);
    graceful.shutdown().await;
}

/// After a failed accept: nothing for an error of the one connection (it is gone); a second's
/// pause for one of the process (out of file descriptors), which retrying at once would only
/// repeat.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "could not accept a connection; accepting again in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    /// A server of `GET /` → `ok` with `opts`, and its address; it stops when the sender is
    /// dropped or sent to.
    async fn server(
        opts: ServeOptions,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let app = Router::new().route("/", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, opts, async move {
            // Sent or dropped: either way, stop.
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    /// Reads one answer of `GET /` (`ok`, 2 bytes) from `c`.
    async fn answer(c: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = c.read(&mut buf).await.expect("read an answer");
            assert!(n > 0, "closed before an answer: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).expect("utf-8")
    }

    /// Waits (at most `within`) for `c` to be closed by the server; returns how long it took.
    async fn closed(c: &mut TcpStream, within: Duration) -> Duration {
        let began = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(within, c.read(&mut buf)).await {
                Err(_) => panic!("still open after {within:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return began.elapsed(),
                // A `408` or the like before the close: read on to the end.
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn headers_sent_too_slowly_and_idle_connections_are_closed() {
        let header_timeout = Duration::from_millis(400);
        let (addr, _stop, _task) = server(ServeOptions {
            header_timeout,
            ..ServeOptions::default()
        })
        .await;
        // Half a request's headers, then nothing (slowloris).
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let took = closed(&mut slow, Duration::from_secs(10)).await;
        assert!(took >= Duration::from_millis(300), "closed early: {took:?}");
        // Nothing at all.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        closed(&mut silent, Duration::from_secs(10)).await;
        // A request answered, then the connection kept alive and idle.
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        idle.write_all(REQUEST).await.expect("write");
        assert!(answer(&mut idle).await.starts_with("HTTP/1.1 200"));
        closed(&mut idle, Duration::from_secs(10)).await;
        // A client that keeps asking is served as long as it asks.
        let mut busy = TcpStream::connect(addr).await.expect("connect");
        for _ in 0..4 {
            busy.write_all(REQUEST).await.expect("write");
            answer(&mut busy).await;
            tokio::time::sleep(header_timeout / 2).await;
        }
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_slot() {
        let (addr, stop, task) = server(ServeOptions {
            header_timeout: Duration::from_secs(60),
            max_connections: 2,
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(REQUEST).await.expect("write");
            answer(&mut c).await;
            held.push(c);
        }
        // The third is taken into the kernel's queue, and not answered while two are open.
        let mut third = TcpStream::connect(addr).await.expect("connect");
        third.write_all(REQUEST).await.expect("write");
        let mut buf = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf))
                .await
                .is_err(),
            "a third connection was served past the cap of two"
        );
        // One closed: the third is served.
        drop(held.pop());
        let got = tokio::time::timeout(Duration::from_secs(10), answer(&mut third))
            .await
            .expect("served once a slot was free");
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        // Shutdown closes the idle connections and returns.
        stop.send(()).expect("the server listens for its stop");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("serve returned after its shutdown")
            .expect("serve did not panic");
        closed(&mut third, Duration::from_secs(10)).await;
    }
}
