//! W3C trace context (`traceparent`) carried in messages.

/// A new root `traceparent`: version 00, a random trace id, a random span id, sampled.
pub(crate) fn root() -> String {
    let trace = crate::seam::uuid_v4().simple().to_string();
    format!("00-{trace}-{:016x}-01", span_id())
}

/// A `traceparent` for a child of `parent` (same trace, new span), or a new root if `parent` is
/// missing or malformed.
pub(crate) fn child(parent: Option<&str>) -> String {
    let Some(p) = parent else { return root() };
    let parts: Vec<&str> = p.split('-').collect();
    let ok = parts.len() == 4
        && parts[0].len() == 2
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
        && parts
            .iter()
            .all(|s| s.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return root();
    }
    format!("{}-{}-{:016x}-{}", parts[0], parts[1], span_id(), parts[3])
}

fn span_id() -> u64 {
    // A zero span id is invalid in W3C trace context.
    crate::seam::random_u64_in(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_keeps_the_trace_and_changes_the_span() {
        let root = root();
        let kid = child(Some(&root));
        assert_eq!(root.len(), 55);
        assert_eq!(&root[..36], &kid[..36]);
        assert_ne!(&root[36..52], &kid[36..52]);
        assert_ne!(&child(Some("garbage"))[3..35], &root[3..35]);
    }
}
