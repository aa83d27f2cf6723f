//! Every size limit Loom enforces, in one place.
//!
//! Limits are checked before anything is written, so an oversized input is a typed error
//! ([`crate::StoreError::TooLarge`] or [`crate::IdError`]) and never a partial write. They are
//! the same for every backend, so a journal can always be migrated from one store to another.

/// Longest actor kind, in bytes.
pub const MAX_KIND_LEN: usize = 64;

/// Longest actor key, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Largest encoded journal entry, in bytes (4 MiB).
pub const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;

/// Most entries in one atomic append.
pub const MAX_BATCH_ENTRIES: usize = 10_000;

/// Largest total encoded size of one atomic append, in bytes (16 MiB).
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Largest encoded snapshot, in bytes (64 MiB).
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// Largest encoded message (envelope with its payload), in bytes (1 MiB).
///
/// Smaller than [`MAX_ENTRY_BYTES`] so that the `Invoked` entry recording a message always fits.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// How deep serde_json reads JSON back: 127 levels of arrays and objects (it writes any).
pub const READ_JSON_DEPTH: usize = 127;

/// Deepest nesting of arrays and objects in a stored record's JSON (a journal entry, a
/// snapshot, a message, a recorded reply), its own wrapping included (an envelope around a
/// message's payload, an entry around a state). A record past it is refused when it is written
/// ([`StoreError::TooLarge`](crate::StoreError::TooLarge), [`Limit::JsonDepth`](crate::Limit::JsonDepth)),
/// instead of being stored and then read as damaged. A message may nest one level less: the
/// entry that invokes it nests its payload one level deeper than its envelope. The levels
/// between it and [`READ_JSON_DEPTH`] are for what wraps a record later: a dead letter around
/// a message, an embedded store's row around a recorded reply, a line of `loom export` or a
/// page of the admin API around an entry or a snapshot.
pub const MAX_JSON_DEPTH: usize = 120;

/// Largest encoded idempotency result, in bytes (1 MiB).
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;

/// Longest text kept as a dead letter's reason or a failure's error, in bytes; longer text is cut
/// at a character boundary and marked, never refused, so that an error can always be recorded.
pub const MAX_REASON_LEN: usize = 8 * 1024;

/// Largest encoded value an error carries to its caller ([`Rejected::with_value`],
/// [`ActivityError::with_value`]), in bytes (64 KiB). A larger value is left out and the
/// error's text says so, so that the error can always be recorded.
///
/// [`Rejected::with_value`]: crate::runtime::Rejected::with_value
/// [`ActivityError::with_value`]: crate::runtime::ActivityError::with_value
pub const MAX_ERROR_VALUE_BYTES: usize = 64 * 1024;

/// `value` as JSON if it encodes within [`MAX_ERROR_VALUE_BYTES`]; otherwise why not.
pub fn error_value<T: serde::Serialize + ?Sized>(value: &T) -> Result<serde_json::Value, String> {
    let v = serde_json::to_value(value).map_err(|e| format!("its value does not encode: {e}"))?;
    crate::finite::refuse_non_finite(value, &v, "value")
        .map_err(|e| format!("its value was left out: {e}"))?;
    let len = serde_json::to_vec(&v)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if len > MAX_ERROR_VALUE_BYTES {
        return Err(format!(
            "its value was left out: {len} bytes, over the limit of {MAX_ERROR_VALUE_BYTES}"
        ));
    }
    Ok(v)
}

/// Longest change id of [`Context::patched`](crate::Context::patched), in bytes.
pub const MAX_CHANGE_ID_LEN: usize = 128;

/// Longest name of an activity or of an awaited event (an empty one is refused too)
/// ([`Context::activity`](crate::Context::activity), [`Context::wait_event`](crate::Context::wait_event)),
/// in bytes. Checked when the step is first taken (a replay takes what its journal holds): a
/// longer name is [`StepError::Invalid`](crate::runtime::StepError::Invalid), instead of a
/// step whose later entries (the event's receipt, which names it) would be refused.
pub const MAX_STEP_NAME_LEN: usize = 1024;

/// Refuses an activity's or an event's name (`what`) that is empty or longer than
/// [`MAX_STEP_NAME_LEN`]: a name is 1 to 1 024 bytes.
pub(crate) fn check_step_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_STEP_NAME_LEN {
        return Err(format!(
            "{what} name is 1 to {MAX_STEP_NAME_LEN} bytes, not {}",
            name.len()
        ));
    }
    Ok(())
}

/// Longest delay of a scheduled message, a century: [`SendOptions::delay`], a
/// [`Context::send_after`], the HTTP ingress's `delay_ms`. A longer one is refused when sent
/// (`SendError::Invalid`, or `StepError::Invalid` in a handler): a due time past it saturated
/// to "never", and the message held its place in the mailbox, and its key, for good.
///
/// [`SendOptions::delay`]: crate::runtime::SendOptions::delay
/// [`Context::send_after`]: crate::Context::send_after
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// Refuses a scheduled message's delay over [`MAX_DELAY`].
pub(crate) fn check_delay(delay: std::time::Duration) -> Result<(), String> {
    if delay > MAX_DELAY {
        return Err(format!(
            "a message's delay is at most {} s (a century), not {} s",
            MAX_DELAY.as_secs(),
            delay.as_secs()
        ));
    }
    Ok(())
}

/// Most dead letters purged in one call ([`crate::Mailbox::purge_dead_letters`]).
pub const MAX_PURGE_IDS: usize = 1000;

/// Longest lease owner (node) name, in bytes.
pub const MAX_OWNER_LEN: usize = 256;

/// Cuts `text` to at most [`MAX_REASON_LEN`] bytes on a character boundary, marking the cut.
pub fn clip_reason(text: &str) -> String {
    if text.len() <= MAX_REASON_LEN {
        return text.to_owned();
    }
    const MARK: &str = "…[cut]";
    let mut end = MAX_REASON_LEN - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_clipped_on_char_boundaries() {
        assert_eq!(clip_reason("short"), "short");
        let long = "é".repeat(MAX_REASON_LEN);
        let clipped = clip_reason(&long);
        assert!(clipped.len() <= MAX_REASON_LEN);
        assert!(clipped.ends_with("[cut]"));
    }

    #[test]
    fn error_values_over_the_limit_are_left_out_with_a_reason() {
        assert_eq!(error_value(&[1, 2]).unwrap(), serde_json::json!([1, 2]));
        let big = "x".repeat(MAX_ERROR_VALUE_BYTES);
        let why = error_value(&big).unwrap_err();
        assert!(why.contains("over the limit"), "{why}");
    }
}
