//! Serving the routers of this crate with the guards `axum::serve` leaves out: a time limit on
//! a request's headers (and on a kept-alive connection's wait for its next request), on each
//! write of an answer, and a cap on the connections served at once.
//!
//! Invariants:
//! - A connection is accepted only while it holds one of the slots, and gives its slot back
//!   when it ends, whether it ended well or not. At the cap, connections wait in the kernel's
//!   listen queue, not in this process: a flood of them cannot take the file descriptors the
//!   runtime's store needs. The slots are at most half the process's open-file limit.
//! - A connection ends when its client stalls: one idle or trickling headers at the header
//!   timeout, one whose client stops reading its answer at the write timeout, and at shutdown
//!   whatever is left after the shutdown timeout. (A client that reads an answer a few bytes
//!   per write timeout keeps its connection as long as the answer lasts: a limit per client
//!   is a proxy's.)
//! - No timeout overflows a clock: each is at most [`LONGEST`].

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
    /// Longest a write of an answer may wait for the client to take any of it (default 30 s):
    /// a client that asks for a large answer and stops reading it has its connection closed.
    pub write_timeout: Duration,
    /// Most connections served at once (default 1 024; 0 counts as 1), and at most half the
    /// process's limit of open files (`ulimit -n`), which the store's files and sockets need
    /// too. Further connections wait in the kernel's listen queue until one closes.
    pub max_connections: usize,
    /// Longest [`serve`] waits, once told to stop, for the requests being answered (default
    /// 30 s); the connections still open then are closed. An ask cut short so still runs its
    /// message: its client asks again with the idempotency key.
    pub shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// The longest any of [`ServeOptions`]' timeouts is taken to be: a year, far from where adding
/// it to the clock overflows (which hyper and the write timeout's stream would panic at).
pub const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

/// The slots [`serve`] gives connections: `wanted`, at least 1, and at most half of `files`,
/// the process's limit of open files, when it has one.
fn slots_for(wanted: usize, files: Option<u64>) -> usize {
    let most = files.map_or(usize::MAX, |f| usize::try_from(f / 2).unwrap_or(usize::MAX));
    wanted.min(most).clamp(1, Semaphore::MAX_PERMITS)
}

/// The process's soft limit of open files, if it has one.
fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` through a pointer to a live, aligned value.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if got != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not read the open-file limit");
        return None;
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` completes, then stops accepting,
/// lets each connection finish the request it is answering, and returns once all have closed
/// or [`ServeOptions::shutdown_timeout`] has passed (closing those left).
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
    let files = open_file_limit();
    let n = slots_for(opts.max_connections, files);
    if n < opts.max_connections {
        tracing::warn!(
            max_connections = opts.max_connections,
            open_file_limit = files,
            serving = n,
            "serving fewer connections at once than asked: half the open-file limit; raise it (ulimit -n) to serve more"
        );
    }
    let slots = Arc::new(Semaphore::new(n));
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Ended connections' tasks, reaped as new ones come, so that the set stays small.
        while let Some(ended) = connections.try_join_next() {
            if let Err(e) = ended {
                tracing::error!(error = %e, "a connection's task panicked");
            }
        }
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
                    if accept_failed(e) {
                        // Out of file descriptors, say: retrying at once would only repeat it.
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = &mut shutdown => break,
                        }
                    }
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
        // hyper times headers only: a write that the client does not take in time fails, which
        // ends the connection.
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(opts.write_timeout.min(LONGEST)));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_timeout.min(LONGEST))
            .serve_connection(
                TokioIo::new(Box::pin(stream)),
                TowerToHyperService::new(app.clone()),
            );
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            // A client gone, a header read timed out: the connection's end, nothing to answer.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed");
            }
            drop(slot);
        });
    }
    // Connections still in the kernel's queue are refused from here on.
    drop(listener);
    if tokio::time::timeout(opts.shutdown_timeout.min(LONGEST), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("closing the connections still answering after the shutdown timeout");
    }
    // Dropped, the set aborts what is left: each task, when it stops, closes its connection.
    drop(connections);
}

/// Whether a failed accept is the process's (out of file descriptors: logged, and worth a
/// pause) rather than the one connection's (gone already: nothing to do).
fn accept_failed(e: std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return false;
    }
    tracing::error!(error = %e, "could not accept a connection; accepting again in a second");
    true
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
        // `/big`: an answer far larger than the socket buffers of both ends.
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/big", get(|| async { vec![b'x'; BIG] }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, opts, async move {
            // Sent or dropped: either way, stop.
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    const BIG: usize = 16 << 20;

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

    /// A connection with a small receive buffer (so that a big answer cannot fit in the
    /// buffers of both ends) that has asked for `/big` and reads none of it yet.
    async fn ask_for_big(addr: std::net::SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .set_recv_buffer_size(16 << 10)
            .expect("receive buffer");
        let mut c = socket.connect(addr).await.expect("connect");
        c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        c
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
        let header_timeout = Duration::from_millis(1000);
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
        assert!(took >= Duration::from_millis(800), "closed early: {took:?}");
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
        for _ in 0..6 {
            busy.write_all(REQUEST).await.expect("write");
            answer(&mut busy).await;
            tokio::time::sleep(header_timeout / 4).await;
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_gives_its_slot_back() {
        let (addr, _stop, _task) = server(ServeOptions {
            write_timeout: Duration::from_millis(500),
            max_connections: 1,
            ..ServeOptions::default()
        })
        .await;
        // Asks for 16 MiB and reads none of it: the server's write waits, then fails.
        let mut stalled = ask_for_big(addr).await;
        // The one slot is the stalled client's until its write times out; then this one is
        // served.
        let mut next = TcpStream::connect(addr).await.expect("connect");
        next.write_all(REQUEST).await.expect("write");
        let got = tokio::time::timeout(Duration::from_secs(20), answer(&mut next))
            .await
            .expect("served once the stalled connection was closed");
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        // What the stalled client reads now ends short of the answer.
        let mut read = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match tokio::time::timeout(Duration::from_secs(20), stalled.read(&mut buf)).await {
                Err(_) => panic!("the stalled connection is still open after {read} bytes"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => read += n,
            }
        }
        assert!(read < BIG, "the whole answer came: {read} bytes");
    }

    #[tokio::test]
    async fn shutdown_closes_what_is_left_after_its_timeout() {
        let (addr, stop, task) = server(ServeOptions {
            header_timeout: Duration::from_secs(600),
            shutdown_timeout: Duration::from_millis(300),
            ..ServeOptions::default()
        })
        .await;
        // Half a request's headers: not idle, so a graceful shutdown waits for it.
        let mut half = TcpStream::connect(addr).await.expect("connect");
        half.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped = Instant::now();
        stop.send(()).expect("the server listens for its stop");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("serve returned after its shutdown timeout, not the header timeout")
            .expect("serve did not panic");
        // It waited for the connection mid-headers (accepted, not dropped with the listener).
        assert!(
            stopped.elapsed() >= Duration::from_millis(250),
            "returned at once: {:?}",
            stopped.elapsed()
        );
        closed(&mut half, Duration::from_secs(20)).await;
    }

    #[tokio::test]
    async fn timeouts_of_duration_max_serve_and_stall_without_a_panic() {
        let (addr, _stop, _task) = server(ServeOptions {
            header_timeout: Duration::MAX,
            write_timeout: Duration::MAX,
            shutdown_timeout: Duration::MAX,
            ..ServeOptions::default()
        })
        .await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(REQUEST).await.expect("write");
        let got = tokio::time::timeout(Duration::from_secs(20), answer(&mut c))
            .await
            .expect("answered");
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        // A stalled write starts the write timer: the connection stays open.
        let mut stalled = ask_for_big(addr).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut read = 0;
        let mut buf = vec![0u8; 1 << 16];
        while read < BIG {
            match tokio::time::timeout(Duration::from_secs(20), stalled.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => panic!("closed after {read} bytes"),
                Ok(Ok(n)) => read += n,
                Err(_) => panic!("stuck after {read} bytes"),
            }
        }
    }

    #[test]
    fn connections_stay_under_half_the_open_file_limit() {
        assert_eq!(slots_for(1024, None), 1024);
        assert_eq!(slots_for(1024, Some(1024)), 512);
        assert_eq!(slots_for(100, Some(1 << 20)), 100);
        assert_eq!(slots_for(0, Some(1024)), 1);
        assert_eq!(slots_for(10, Some(1)), 1);
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_slot() {
        let (addr, stop, task) = server(ServeOptions {
            header_timeout: Duration::from_secs(60),
            max_connections: 2,
            ..ServeOptions::default()
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
