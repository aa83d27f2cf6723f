//! `loom serve`: the admin API and Loom Studio over a store, until Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;

use loom_core::Store;
use loom_http::{AdminOptions, ServeOptions};

use crate::output::{Failure, out};

pub async fn serve(
    store: Arc<dyn Store>,
    listen: SocketAddr,
    allow_writes: bool,
    guards: ServeOptions,
    json: bool,
) -> Result<(), Failure> {
    // Only writes use the token: a read-only serve does not look at it.
    let token = match std::env::var("LOOM_TOKEN") {
        _ if !allow_writes => None,
        Ok(t) if t.is_empty() || t.trim() != t || !t.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err(Failure(
                "LOOM_TOKEN must be visible ASCII with no spaces (it is compared as sent in `Authorization: Bearer …`)".into(),
            ));
        }
        Ok(t) => Some(t),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(Failure("LOOM_TOKEN is not valid UTF-8".into()));
        }
    };
    if allow_writes && token.is_none() {
        return Err(Failure(
            "--allow-writes needs a token: set LOOM_TOKEN (every write must carry it as `Authorization: Bearer $LOOM_TOKEN`)".into(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure(format!("could not listen on {listen}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure(format!("could not read the address listened on: {e}")))?;
    // On a loopback address, only requests to it by its own names: a web page cannot reach it
    // through a name of its own that resolves here (DNS rebinding).
    let hosts = AdminOptions::hosts_for(bound);
    let warning = bound.ip().is_unspecified().then(|| format!(
        "listening on every interface ({bound}): the admin API answers whatever host name a request uses, so a web page this machine's browser visits could reach it through a name that resolves here; listen on a loopback address or put it behind a proxy that checks the host"
    ));
    // With --json, in the banner object (stderr holds only a failure's object).
    if let (Some(w), false) = (&warning, json) {
        eprintln!("warning: {w}");
    }
    // The store's gauges and health beside the admin API (no runtime here: its counters are
    // its own process's).
    let prometheus = loom_http::install_prometheus()
        .map_err(|e| Failure(format!("could not start the metrics exporter: {e}")))?;
    let app = loom_http::admin(
        store.clone(),
        AdminOptions {
            allow_writes,
            token,
            hosts,
        },
    )
    .merge(loom_http::store_monitor(store, prometheus));
    // Listening for Ctrl-C from before the line that says it serves, so that a Ctrl-C right
    // after it stops the server cleanly instead of killing the process.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Failure(format!("could not listen for Ctrl-C: {e}")))?;
    if json {
        // One object, as every command's output with --json.
        out(serde_json::json!({
            "listening": format!("http://{bound}/"), "writes": allow_writes, "warning": warning,
        }))?;
    } else {
        out(format_args!(
            "Loom Studio on http://{bound}/ ({})",
            if allow_writes {
                "writes allowed with the token"
            } else {
                "read only"
            }
        ))?;
    }
    loom_http::serve(listener, app, guards, async move {
        // `None`: the signal stream ended, which it does only as the process exits.
        interrupt.recv().await;
    })
    .await;
    Ok(())
}
