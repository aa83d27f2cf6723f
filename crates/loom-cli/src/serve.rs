//! `loom serve`: the admin API and Loom Studio over a store, until Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;

use loom_core::Store;
use loom_http::AdminOptions;

use crate::output::{Failure, out};

pub async fn serve(
    store: Arc<dyn Store>,
    listen: SocketAddr,
    allow_writes: bool,
) -> Result<(), Failure> {
    let token = std::env::var("LOOM_TOKEN").ok().filter(|t| !t.is_empty());
    if allow_writes && token.is_none() {
        return Err(Failure(
            "--allow-writes needs a token: set LOOM_TOKEN (every write must carry it as `Authorization: Bearer $LOOM_TOKEN`)".into(),
        ));
    }
    let app = loom_http::admin(
        store,
        AdminOptions {
            allow_writes,
            token,
        },
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure(format!("could not listen on {listen}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure(format!("could not read the address listened on: {e}")))?;
    out(format_args!(
        "Loom Studio on http://{bound}/ ({})",
        if allow_writes {
            "writes allowed with the token"
        } else {
            "read only"
        }
    ))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!(error = %e, "could not wait for Ctrl-C; serving until killed");
                std::future::pending::<()>().await;
            }
        })
        .await
        .map_err(|e| Failure(format!("serving stopped: {e}")))
}
