//! What the `loom` command shares with `loom-dev` (its benchmarks and torture, kept out of the
//! user's binary so that `loom` links no test kit): opening a store from its URL, printing
//! results and failures, and the program's frame (logs, the async runtime, exit codes).

pub mod output;
pub mod store;

use std::future::Future;
use std::process::ExitCode;

use output::Failure;

/// Runs a command's future on a multi-thread tokio runtime, with logs on stderr and traces
/// over OTLP when asked ([`loom_telemetry::init`], naming the process `service`), and turns its
/// outcome into the exit code: a failure is printed as `error: …`, or with `json` as one
/// object `{"error", "hint"}` on stderr, so that what the command printed on stdout before it
/// failed (a report, rows) stays parseable.
pub fn main_with<F>(service: &str, json: bool, run: F) -> ExitCode
where
    F: Future<Output = Result<(), Failure>>,
{
    let telemetry = match loom_telemetry::init(service) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("warning: no logs: {e}");
            None
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run);
    if let Some(Err(e)) = telemetry.map(loom_telemetry::Telemetry::shutdown) {
        eprintln!("warning: {e}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if json => {
            let (error, hint) = f.split();
            eprintln!("{}", serde_json::json!({ "error": error, "hint": hint }));
            ExitCode::FAILURE
        }
        Err(Failure(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
