//! Logs and traces for programs that run Loom, set up with one call.
//!
//! [`init`] installs a `tracing` subscriber with:
//!
//! - **logs on stderr**: warnings by default (a store whose settings cannot keep Loom's
//!   promises, a store failure), more with `RUST_LOG` (`info`, `debug`, `loom_core=debug`, any
//!   [`EnvFilter`] spec; a spec that names only some targets keeps warnings for the rest);
//! - **traces over OTLP**, only when asked: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, Loom's spans go to that collector over
//!   OTLP/HTTP (protobuf), batched on a thread of their own. The service is named by
//!   `OTEL_SERVICE_NAME`, else by the name given to [`init`]; `OTEL_SDK_DISABLED=true` turns
//!   export off.
//!
//! The spans Loom records (at `INFO`, whatever `RUST_LOG` says, when exporting):
//!
//! | span | what it covers |
//! |---|---|
//! | `<kind> invocation` (`loom.invocation`) | one delivery of a message to an actor, start to finish |
//! | `activity <name>` (`loom.activity`) | an activity, every attempt and backoff of it in this run |
//! | `loom.sleep`, `loom.wait_event` | a durable sleep, a wait for an event |
//! | `loom.store.commit` | a turn's atomic write to the store |
//! | `loom.relay` | one hop of the embedded store's outbox relay, linked to the messages' traces |
//!
//! An invocation's span is a child of the span that sent its message, across actors and
//! processes: a message carries its sender's W3C `traceparent`. So one request that travels
//! through several actors is one trace: an HTTP caller's span, then the first actor's
//! invocation, then the invocation of the actor it sent to, and so on.
//!
//! ```no_run
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let telemetry = loom_telemetry::init("bank")?;
//!     // ... run the runtime ...
//!     telemetry.shutdown()?; // sends what is still batched
//!     Ok(())
//! }
//! ```

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Why [`init`] or [`Telemetry::shutdown`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A subscriber is installed already (set up once per process).
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadySet(String),
    /// The OTLP exporter could not be built (a malformed endpoint, say). [`init`] reports it
    /// as a warning and goes on with logs only.
    #[error("the OTLP trace exporter could not be set up: {0}")]
    Exporter(String),
    /// Spans still batched could not be sent when shutting down.
    #[error("could not send the last spans to the OTLP collector: {0}")]
    Flush(String),
}

/// What [`init`] set up; [`shutdown`](Self::shutdown) sends the spans still batched.
#[derive(Debug)]
#[must_use = "dropping it without `shutdown` loses the spans still batched"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True if spans are exported over OTLP.
    pub fn exports(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still batched and stops the exporter (with nothing to export, does
    /// nothing).
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        match self.provider.take() {
            Some(p) => p
                .shutdown()
                .map_err(|e| TelemetryError::Flush(e.to_string())),
            None => Ok(()),
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            // No subscriber to tell once the provider is gone: straight to stderr.
            eprintln!("warning: could not send the last spans to the OTLP collector: {e}");
        }
    }
}

/// A program's `main` around `run`: [`init`] first (a failure to set up is the program's
/// failure), then `run`, then the spans still batched sent; `run`'s error is printed as
/// `error: …` and the exit code says which.
///
/// ```no_run
/// fn run() -> Result<(), String> {
///     Ok(())
/// }
///
/// fn main() -> std::process::ExitCode {
///     loom_telemetry::main_with("my-service", run)
/// }
/// ```
pub fn main_with<E: std::fmt::Display>(
    service: &str,
    run: impl FnOnce() -> Result<(), E>,
) -> std::process::ExitCode {
    let telemetry = match init(service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    };
    if let Err(e) = telemetry.shutdown() {
        eprintln!("warning: {e}");
    }
    code
}

/// Installs the process's `tracing` subscriber: logs on stderr filtered by `RUST_LOG`
/// ([`log_filter`]), and OTLP export of spans when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (see the crate's documentation). `service`
/// names the process in the traces unless `OTEL_SERVICE_NAME` does.
pub fn init(service: &str) -> Result<Telemetry, TelemetryError> {
    let (filter, bad_spec) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    // An exporter that cannot be set up (a malformed endpoint) loses the traces, never the
    // logs: it is reported as a warning once logging works.
    let (provider, exporter_error) = match exporting().then(|| provider(service)) {
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("loom"))
            .with_filter(LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    if let Some(e) = bad_spec {
        tracing::warn!("RUST_LOG is not a filter ({e}); showing warnings");
    }
    if let Some(e) = exporter_error {
        tracing::warn!("{e}; spans are not exported");
        // On stderr as well: a RUST_LOG that hides warnings must not hide that traces are lost.
        eprintln!("warning: {e}; spans are not exported");
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    Ok(Telemetry { provider })
}

/// True if the environment asks for OTLP export.
fn exporting() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn provider(service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    // `Resource::builder` reads `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`; the name
    // given here is the default.
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty()) {
        Resource::builder().build()
    } else {
        Resource::builder()
            .with_service_name(service.to_owned())
            .build()
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The log filter for a `RUST_LOG` value: warnings when unset or empty; the spec with
/// warnings kept for every target it does not name (`loom_core=debug` becomes
/// `warn,loom_core=debug`; a spec that sets a level for everything, such as `error` or
/// `info,sqlx=off`, is taken as it is). A spec that is not a filter gives warnings and the
/// reason, to report once logging works.
///
/// ```
/// let (filter, bad) = loom_telemetry::log_filter(Some("loom_core=debug"));
/// assert_eq!(filter.to_string(), "loom_core=debug,warn");
/// assert!(bad.is_none());
/// let (filter, bad) = loom_telemetry::log_filter(Some("loom_core=loud"));
/// assert_eq!(filter.to_string(), "warn");
/// assert!(bad.is_some());
/// ```
pub fn log_filter(spec: Option<&str>) -> (EnvFilter, Option<String>) {
    match spec {
        Some(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(with_warnings(spec)) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("warn"), Some(format!("{spec:?}: {e}"))),
        },
        _ => (EnvFilter::new("warn"), None),
    }
}

/// `spec` with warnings kept for every target it does not name (see [`log_filter`]).
fn with_warnings(spec: &str) -> String {
    // Empty pieces (a trailing or doubled comma) would read as a level of their own: dropped.
    let pieces: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let global = pieces.iter().any(|d| d.parse::<LevelFilter>().is_ok());
    if global {
        pieces.join(",")
    } else {
        std::iter::once("warn")
            .chain(pieces)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::with_warnings;

    #[test]
    fn a_filter_that_names_some_targets_keeps_warnings_for_the_rest() {
        assert_eq!(with_warnings("loom_core=debug"), "warn,loom_core=debug");
        assert_eq!(with_warnings("loom_core"), "warn,loom_core");
        assert_eq!(with_warnings("error"), "error");
        assert_eq!(with_warnings("info,sqlx=off"), "info,sqlx=off");
        assert_eq!(with_warnings("DEBUG"), "DEBUG");
        assert_eq!(with_warnings("loom_core=debug,"), "warn,loom_core=debug");
        assert_eq!(with_warnings(" ,error,,"), "error");
    }
}
