//! W3C trace context (`traceparent`) carried in messages, through OpenTelemetry's propagator.
//!
//! A message's `traceparent` names the span that sent it: the receiving invocation's span is
//! its child (see `Cell::process`), so one request that travels through several actors is one
//! trace, each hop a child of the one before. Which span that is, in order:
//!
//! 1. the caller's own, when it names one (`SendOptions::traceparent`, an HTTP request's
//!    `traceparent` header);
//! 2. the current `tracing` span, when an OpenTelemetry layer records it (an invocation, an
//!    application's request span), else the current OpenTelemetry context;
//! 3. with no such layer: a new span id in the trace of the message being handled, so that
//!    logs still tie a chain of messages together;
//! 4. else a new trace.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

/// One `traceparent` as the propagator reads it.
struct Carrier<'a>(&'a str);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The span context `traceparent` names, if W3C trace context says to accept it: fields of
/// 2-32-16-2 lowercase hex digits (exactly those four for version `00`, more allowed after them
/// for a later version), a version other than `ff`, ids that are not all zeros. Checked here
/// lexically (the SDK's parser also takes signs, an uppercase version and shorter ids), then
/// read by the propagator.
fn parse(traceparent: &str) -> Option<SpanContext> {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next();
    if !(hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2))
        || version == "ff"
        || (version == "00" && rest.is_some())
    {
        return None;
    }
    // From an empty context: a refused header gives nothing, never the caller's current span.
    let cx = TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &Carrier(&traceparent[..55]));
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// A span context as a version-00 `traceparent` (the sampled flag only, as the propagator
/// writes it).
fn format(span: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8()
    )
}

/// The OpenTelemetry context a message's `traceparent` names: the parent of the span that
/// handles it. Empty (a new trace) if it names none that W3C trace context accepts.
pub(crate) fn parent(traceparent: Option<&str>) -> Context {
    match traceparent.and_then(parse) {
        Some(span) => Context::new().with_remote_span_context(span),
        None => Context::new(),
    }
}

/// The `traceparent` of a message sent now: the caller's (`explicit`), else the current span's,
/// else a new span in the trace of `handling` (the message being handled), else a new trace.
/// See the module's documentation.
pub(crate) fn outgoing(explicit: Option<&str>, handling: Option<&str>) -> String {
    if let Some(span) = explicit.and_then(parse) {
        return format(&span);
    }
    // The current `tracing` span when an OpenTelemetry layer records it; else the current
    // OpenTelemetry context (a span that layer filters out, say a `debug_span!` under an `INFO`
    // filter, leaves its parent's context active).
    let current = tracing::Span::current().context();
    for cx in [current, Context::current()] {
        let span = cx.span().span_context().clone();
        if span.is_valid() {
            return format(&span);
        }
    }
    let span = match handling.and_then(parse) {
        Some(p) => SpanContext::new(
            p.trace_id(),
            span_id(),
            p.trace_flags(),
            false,
            TraceState::default(),
        ),
        None => SpanContext::new(
            TraceId::from(crate::seam::uuid_v4().as_u128()),
            span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
    };
    format(&span)
}

fn span_id() -> SpanId {
    // A zero span id is invalid in W3C trace context.
    SpanId::from(crate::seam::random_u64_in(1..))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn a_caller_span_is_the_parent_and_a_handled_message_keeps_its_trace() {
        let caller = format!("00-{TRACE}-00f067aa0ba902b7-01");
        // The caller's span is the message's parent as it is.
        assert_eq!(outgoing(Some(&caller), None), caller);
        // Sent while handling a message (no OpenTelemetry layer here): same trace, new span.
        let kid = outgoing(None, Some(&caller));
        assert_eq!(kid.len(), 55);
        assert_eq!(&kid[..36], &caller[..36]);
        assert_ne!(&kid[36..52], &caller[36..52]);
        // Unsampled stays unsampled.
        assert!(outgoing(None, Some(&format!("00-{TRACE}-00f067aa0ba902b7-00"))).ends_with("-00"));
        // A later version's traceparent is read and written back as version 00.
        assert_eq!(
            outgoing(Some(&format!("01-{TRACE}-00f067aa0ba902b7-01")), None),
            caller
        );
        // Nothing to go on: a new trace each time.
        let (a, b) = (outgoing(None, None), outgoing(None, None));
        assert_ne!(&a[3..35], &b[3..35]);
        assert!(parse(&a).is_some());
    }

    #[test]
    fn an_active_context_is_the_parent_and_never_stands_in_for_a_refused_header() {
        let caller = format!("00-{TRACE}-00f067aa0ba902b7-01");
        let _active = Context::new()
            .with_remote_span_context(parse(&caller).expect("valid"))
            .attach();
        // No tracing span records it (no layer here), but it is the current context.
        assert_eq!(outgoing(None, None), caller);
        // A refused header is refused, not read as the current context.
        let bad = format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase());
        assert!(parse(&bad).is_none());
        assert!(!parent(Some(&bad)).span().span_context().is_valid());
    }

    #[test]
    fn what_w3c_trace_context_refuses_starts_a_new_trace() {
        for bad in [
            format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase()),
            format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{TRACE}-0000000000000000-01"),
            format!("00-{}-00f067aa0ba902b7-01", &TRACE[..31]),
            format!("00-{TRACE}-f067aa0ba902b7-01"),
            format!("00-{TRACE}-00f067aa0ba902b7-1"),
            format!("00-{TRACE}-00f067aa0ba902b7-01-extra"),
            format!("00-{TRACE}-00f067aa0ba902b7-01-"),
            format!("00-+{}-00f067aa0ba902b7-01", &TRACE[1..]),
            format!("0A-{TRACE}-00f067aa0ba902b7-01"),
            format!("00-{TRACE}-00f067aa0ba902b7-01 "),
            "garbage".to_owned(),
            String::new(),
        ] {
            assert!(parse(&bad).is_none(), "{bad:?} was accepted");
            let got = outgoing(Some(&bad), None);
            assert!(
                !got.to_lowercase().contains(TRACE),
                "{bad:?} was carried on: {got}"
            );
            assert!(!parent(Some(&bad)).span().span_context().is_valid());
        }
    }
}
