//! What the `loom` command shares with `loom-dev` (its benchmarks and torture, kept out of the
//! user's binary so that `loom` links no test kit): opening a store from its URL, printing
//! results and failures, and the program's frame (logs, the async runtime, exit codes).

pub mod output;
pub mod store;

use std::future::Future;
use std::process::ExitCode;

use output::Failure;
use store::Namespace;

/// The options every command of `loom` and of `loom-dev` takes (`#[command(flatten)]`).
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Key prefix on a Redis store (the runtime's default is `loom`).
    #[arg(long, global = true, default_value = "loom")]
    pub redis_prefix: String,
    /// Schema on a PostgreSQL store (the runtime's default is `loom`).
    #[arg(long, global = true, default_value = "loom")]
    pub pg_schema: String,
    /// Results as JSON (one object per line) instead of tables and sentences, and a failure
    /// as one object `{"error", "hint"}` on stderr.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Common {
    /// Where Loom's keys and tables are on the stores these options name.
    pub fn namespace(&self) -> Namespace {
        Namespace {
            redis_prefix: self.redis_prefix.clone(),
            pg_schema: self.pg_schema.clone(),
        }
    }
}

/// Runs a command's future on a multi-thread tokio runtime, with logs on stderr and traces
/// over OTLP when asked ([`loom_telemetry::init`], naming the process `service`), and turns its
/// outcome into the exit code: 0, or for a failure [`output::failure_code`] (1 for damage a
/// check found, 2 for any other failure). A failure is printed as `error: …`, or with `json`
/// as one object `{"error", "hint", "damage"}` on stderr, so that what the command printed on
/// stdout before it failed (a report, rows) stays parseable.
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
            return ExitCode::from(output::EXIT_FAILED);
        }
    };
    let result = rt.block_on(run);
    if let Some(Err(e)) = telemetry.map(loom_telemetry::Telemetry::shutdown) {
        eprintln!("warning: {e}");
    }
    let Err(f) = result else {
        return ExitCode::SUCCESS;
    };
    let code = output::failure_code();
    if json {
        let (error, hint) = f.split();
        let damage = code == output::EXIT_DAMAGE;
        eprintln!(
            "{}",
            serde_json::json!({ "error": error, "hint": hint, "damage": damage })
        );
    } else {
        eprintln!("error: {}", f.0);
    }
    ExitCode::from(code)
}
