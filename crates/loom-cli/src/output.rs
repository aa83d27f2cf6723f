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
