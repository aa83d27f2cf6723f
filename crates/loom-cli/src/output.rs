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

/// Prints a table: `header`, then `rows`, in columns two spaces apart (no borders, so that
/// `grep` and `awk` read it as they read `ps`), the columns numbered in `right` aligned right.
pub fn table(header: &[&str], rows: Vec<Vec<String>>, right: &[usize]) -> Result<(), Failure> {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    t.set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    for (i, c) in t.column_iter_mut().enumerate() {
        c.set_padding((0, 2));
        if right.contains(&i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    for line in t.lines() {
        out(line.trim_end())?;
    }
    Ok(())
}

/// `-` for nothing: an empty list, no value.
pub fn dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// Prints a command's result: `value` as one JSON line with `--json`, else `sentence`.
pub fn report(
    json: bool,
    value: serde_json::Value,
    sentence: impl std::fmt::Display,
) -> Result<(), Failure> {
    if json { out(value) } else { out(sentence) }
}

/// The exit code of a check that ran to its end and found damage (`loom journal verify`).
pub const EXIT_DAMAGE: u8 = 1;
/// The exit code of every other failure: an error stopped the command, or it was refused (as
/// clap's own for arguments it cannot parse).
pub const EXIT_FAILED: u8 = 2;

/// Whether this run found damage: see [`found_damage`].
static DAMAGE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks this run as having found damage in what it checked, so that its failure exits with
/// [`EXIT_DAMAGE`] rather than [`EXIT_FAILED`]: a script tells "the data is damaged" from "the
/// check could not run" (a store out of reach), which found nothing for sure.
pub fn found_damage() {
    DAMAGE.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The exit code of a failed run: [`EXIT_DAMAGE`] once [`found_damage`] was called, else
/// [`EXIT_FAILED`].
pub fn failure_code() -> u8 {
    if DAMAGE.load(std::sync::atomic::Ordering::SeqCst) {
        EXIT_DAMAGE
    } else {
        EXIT_FAILED
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
