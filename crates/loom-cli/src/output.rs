//! Printing results and failures.

/// A failure to report to the user: what went wrong and what to do about it.
#[derive(Debug)]
pub struct Failure(pub String);

impl Failure {
    /// What went wrong, and what to do about it if Loom knows (the part
    /// [`loom_core::explain`] puts after "what to do: ").
    pub fn split(&self) -> (&str, Option<&str>) {
        match self.0.split_once("\nwhat to do: ") {
            Some((error, hint)) => (error, Some(hint)),
            None => (&self.0, None),
        }
    }
}

impl<E: std::error::Error + 'static> From<E> for Failure {
    /// The error as a sentence, with what to do when Loom knows ([`loom_core::explain`]).
    fn from(e: E) -> Self {
        Failure(loom_core::explain(&e))
    }
}

/// Prints one line of output. A reader that went away (`loom … | head`) ends the program quietly
/// and successfully, as Unix tools do.
pub fn out(line: impl std::fmt::Display) -> Result<(), Failure> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Failure(format!("cannot write output: {e}"))),
    }
}
