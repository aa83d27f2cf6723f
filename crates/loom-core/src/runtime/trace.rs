//! W3C trace context (`traceparent`) carried in messages.

/// A new root `traceparent`: version 00, a random trace id, a random span id, sampled.
pub(crate) fn root() -> String {
    let trace = crate::seam::uuid_v4().simple().to_string();
    format!("00-{trace}-{:016x}-01", span_id())
}

/// A `traceparent` for a child of `parent` (same trace, new span, version 00, the parent's
/// flags), or a new root if `parent` is missing or not one W3C trace context says to accept:
/// lowercase hex fields of 2-32-16-2 digits, a version other than `ff`, a trace id and a
/// parent id that are not all zeros.
pub(crate) fn child(parent: Option<&str>) -> String {
    let Some(p) = parent else { return root() };
    let parts: Vec<&str> = p.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    let ok = parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && !zero(parts[1])
        && hex(parts[2], 16)
        && !zero(parts[2])
        && hex(parts[3], 2);
    if !ok {
        return root();
    }
    format!("00-{}-{:016x}-{}", parts[1], span_id(), parts[3])
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
        // Not accepted: uppercase, version ff, an all-zero trace or parent id.
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        for bad in [
            format!("00-{}-00f067aa0ba902b7-01", trace.to_uppercase()),
            format!("ff-{trace}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{trace}-0000000000000000-01"),
        ] {
            let got = child(Some(&bad));
            assert!(
                !got.contains(trace) && !got.contains(&trace.to_uppercase()),
                "{bad} was accepted: {got}"
            );
        }
        assert!(
            child(Some(&format!("01-{trace}-00f067aa0ba902b7-01")))
                .starts_with(&format!("00-{trace}-"))
        );
    }
}
