//! The source of each script: of `loom.lua`, only the functions its entry point reaches.
//!
//! Redis runs a script's whole text on every call, so a script that carried all of `loom.lua`
//! would define every one of its functions (a closure each) on every call, before doing any
//! work: measured on a private Redis 7.0, `EVALSHA` of the whole file and a `return 1` ran at
//! 145k calls/s, against 463k/s for `return 1` alone. Each script therefore takes the
//! functions its entry point calls, and those they call, in the file's order (a `local
//! function` sees only those above it, so the order is kept).
//!
//! This relies on the file's shape, which the tests check: every top-level item is a
//! `local function name(` … `end` block (`end` alone on its line, nested functions indented),
//! and between them there are only comments and blank lines. A function's calls are the names
//! of other functions in its code, read without its comments, its string literals and field
//! names (`h.settle` is not a call of `settle`).

use std::collections::BTreeSet;

/// One top-level `local function` of the file.
struct Function<'a> {
    name: &'a str,
    text: &'a str,
}

/// The file's functions, in order; `Err` names the first line that is not in a function,
/// a comment or blank.
fn functions(src: &str) -> Result<Vec<Function<'_>>, String> {
    let mut out = Vec::new();
    let mut start: Option<(usize, &str)> = None;
    let mut offset = 0;
    for (n, line) in src.split_inclusive('\n').enumerate() {
        let here = offset;
        offset += line.len();
        let bare = line.trim_end();
        match start {
            Some((_, name)) if bare.starts_with("local function ") => {
                return Err(format!(
                    "line {}: a function begins before {name} ends (its `end` must be alone on \
                     its line)",
                    n + 1
                ));
            }
            None => {
                if let Some(rest) = bare.strip_prefix("local function ") {
                    let name = rest.split('(').next().unwrap_or("").trim();
                    start = Some((here, name));
                } else if !(bare.is_empty() || bare.starts_with("--")) {
                    return Err(format!("line {}: {bare:?} is outside any function", n + 1));
                }
            }
            Some((from, name)) if bare == "end" => {
                out.push(Function {
                    name,
                    text: &src[from..offset],
                });
                start = None;
            }
            Some(_) => {}
        }
    }
    match start {
        Some((_, name)) => Err(format!("function {name} has no closing `end` line")),
        None => Ok(out),
    }
}

/// The script for `entry`: the functions it reaches, then `return entry(KEYS, ARGV)`.
///
/// # Panics
///
/// If `src` is not shaped as described above or has no function `entry`: both are mistakes in
/// the source, which every test that connects a store would meet at once.
pub(crate) fn script_source(src: &str, entry: &str) -> String {
    let all = functions(src).unwrap_or_else(|e| panic!("loom.lua: {e}"));
    assert!(
        all.iter().any(|f| f.name == entry),
        "loom.lua has no function {entry}"
    );
    let mut reached: BTreeSet<&str> = BTreeSet::from([entry]);
    // The file's order is an order in which every function comes after those it calls, so
    // one pass from the bottom up finds everything reachable.
    for f in all.iter().rev() {
        if !reached.contains(f.name) {
            continue;
        }
        for word in names_used(f.text) {
            if word != f.name && all.iter().any(|g| g.name == word) {
                reached.insert(word);
            }
        }
    }
    let mut out = String::new();
    for f in all.iter().filter(|f| reached.contains(f.name)) {
        out.push_str(f.text);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out.push_str(&format!("return {entry}(KEYS, ARGV)\n"));
    out
}

/// The names `code` uses: its identifiers outside comments (`--` to the end of the line) and
/// string literals (`'…'`, `"…"`, with `\` escapes), and not after a `.` or `:` (fields and
/// methods).
fn names_used(code: &str) -> Vec<&str> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() && bytes[i] != q {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let member = start > 0 && matches!(bytes[start - 1], b'.' | b':');
                // `name =` (not `==`) names a table field or a variable being assigned, never a
                // call: `{ park = v[1] }` does not call `park`.
                let rest = code[i..].trim_start_matches([' ', '\t']).as_bytes();
                let assigned = rest.first() == Some(&b'=') && rest.get(1) != Some(&b'=');
                if !member && !assigned {
                    out.push(&code[start..i]);
                }
            }
            c if c.is_ascii_digit() => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_functions_comments_and_blank_lines() {
        let all = functions(crate::LUA).expect("loom.lua keeps its shape");
        assert!(all.len() > 40, "{} functions", all.len());
        let names: BTreeSet<&str> = all.iter().map(|f| f.name).collect();
        assert_eq!(names.len(), all.len(), "a function defined twice");
    }

    #[test]
    fn a_script_takes_what_its_entry_reaches_in_the_files_order() {
        let src = "-- a comment\n\
                   local function a()\n  return 1\nend\n\n\
                   local function b()\n  return a() + 1\nend\n\
                   local function c()\n  return 3\nend\n\
                   -- between\n\
                   local function d(KEYS, ARGV)\n  return b() + c_not_a_call\nend\n";
        let s = script_source(src, "d");
        assert!(s.contains("local function a()") && s.contains("local function b()"));
        assert!(!s.contains("local function c()"), "{s}");
        assert!(s.find("function a").unwrap() < s.find("function b").unwrap());
        assert!(s.ends_with("return d(KEYS, ARGV)\n"), "{s}");
    }

    #[test]
    fn a_misshapen_file_is_refused() {
        assert!(functions("local x = 1\n").is_err());
        assert!(functions("local function a()\n  return 1\n").is_err());
        // A one-line function would swallow the next one.
        assert!(
            functions("local function a() return 1 end\nlocal function b()\n  return 2\nend\n")
                .is_err()
        );
    }

    #[test]
    fn comments_strings_and_fields_are_not_calls() {
        let used = names_used(
            "local x = h.settle + t:lease() -- park here\n y('park', \"a\\\"b\") z2 { f = 1 } x == g",
        );
        assert_eq!(used, ["local", "h", "t", "y", "z2", "x", "g"]);
    }

    /// Every entry point of the file (a function of `(KEYS, ARGV)`) gets a script that defines
    /// it and every function any of its functions calls.
    /// The functions of `all` that a script can start at: `local function name(KEYS, ARGV)`,
    /// or `(KEYS, ARGV, now)` for those `batch` passes its clock reading to.
    fn entry_points<'a>(all: &[Function<'a>]) -> Vec<&'a str> {
        all.iter()
            .filter(|f| {
                f.text
                    .starts_with(&format!("local function {}(KEYS, ARGV", f.name))
            })
            .map(|f| f.name)
            .collect()
    }

    #[test]
    fn every_entrys_script_is_closed_under_its_calls() {
        let all = functions(crate::LUA).expect("loom.lua keeps its shape");
        let names: BTreeSet<&str> = all.iter().map(|f| f.name).collect();
        let entries = entry_points(&all);
        assert!(entries.len() > 25, "{entries:?}");
        for entry in entries {
            let script = script_source(crate::LUA, entry);
            let got = functions(&script[..script.rfind("return ").expect("a return")])
                .expect("a script keeps the file's shape");
            let defined: BTreeSet<&str> = got.iter().map(|f| f.name).collect();
            assert!(
                defined.contains(entry),
                "{entry} is not defined in its own script"
            );
            for f in &got {
                for word in names_used(f.text) {
                    assert!(
                        !names.contains(word) || defined.contains(word),
                        "{entry}'s script calls {word} (in {}) without defining it",
                        f.name
                    );
                }
            }
        }
    }

    /// `batch` runs an entry by the name Rust gives it, from its table: the table must list
    /// every batched entry point, by its own name, and nothing else.
    #[test]
    fn the_batch_table_lists_every_entry_by_its_name() {
        let all = functions(crate::LUA).expect("loom.lua keeps its shape");
        let batch = all
            .iter()
            .find(|f| f.name == "batch")
            .expect("a batch function");
        let table = batch
            .text
            .split("local entries = {")
            .nth(1)
            .and_then(|t| t.split('}').next())
            .expect("batch's table of entries");
        let listed: BTreeSet<&str> = table
            .split(',')
            .filter(|pair| !pair.trim().is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("name = function");
                assert_eq!(
                    k.trim(),
                    v.trim(),
                    "{pair:?} calls another entry than its name"
                );
                k.trim()
            })
            .collect();
        let batched: BTreeSet<&str> = crate::BATCHED.iter().copied().collect();
        assert_eq!(listed, batched);
        let entry_points: BTreeSet<&str> = entry_points(&all)
            .into_iter()
            .filter(|n| *n != "batch")
            .collect();
        let declared: BTreeSet<&str> = crate::BATCHED.iter().chain(crate::ALONE).copied().collect();
        assert_eq!(
            entry_points, declared,
            "every entry point of the file has a script"
        );
    }

    #[test]
    fn the_append_script_is_a_fraction_of_the_file() {
        let s = script_source(crate::LUA, "append");
        assert!(s.contains("local function append(KEYS, ARGV)"), "{s}");
        assert!(s.contains("local function j_append("), "{s}");
        assert!(
            s.len() * 4 < crate::LUA.len(),
            "{} of {}",
            s.len(),
            crate::LUA.len()
        );
    }
}
