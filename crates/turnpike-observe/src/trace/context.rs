//! W3C Trace Context (`traceparent`, `tracestate`): strict parsing, ids, and the header
//! values the gateway sends upstream.
//!
//! Parsing follows the W3C recommendation: lower-case hex only, no all-zero ids, version
//! `ff` refused, a version-00 header exactly 55 characters, a later version read by its
//! first four fields. A `traceparent` that fails any rule is treated as absent, and the
//! `tracestate` that came with it is dropped with it.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Most list members a `tracestate` may carry (W3C: 32); one with more is dropped.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Longest `tracestate` kept, in bytes (W3C asks at least 512 to be propagated); a longer
/// one is dropped whole rather than cut at an arbitrary member.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// The caller's trace context, as read from a valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace id (never all zeroes).
    pub trace_id: [u8; 16],
    /// The caller's span id, parent of the gateway's span (never all zeroes).
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

impl Parent {
    /// Whether the caller recorded its span.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The request's `traceparent`, when there is exactly one and it is valid.
pub fn parent(headers: &HeaderMap) -> Option<Parent> {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    parse_traceparent(first.as_bytes())
}

/// Parses one `traceparent` value.
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    if version == 0xff {
        return None;
    }
    // Version 00 has exactly four fields; a later version may append more after a dash.
    if (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut span_id = [0u8; 8];
    for (i, b) in span_id.iter_mut().enumerate() {
        *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        flags,
    })
}

/// Two lower-case hex digits; upper case is not allowed in trace context.
fn hex_byte(b: &[u8]) -> Option<u8> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(digit(*b.first()?)? << 4 | digit(*b.get(1)?)?)
}

/// The request's `tracestate` (every field line joined), when it is well formed and within
/// [`MAX_TRACESTATE_MEMBERS`] and [`MAX_TRACESTATE_BYTES`]; `None` when absent or refused.
pub fn tracestate(headers: &HeaderMap) -> Option<String> {
    let mut joined = String::new();
    for v in headers.get_all(&TRACESTATE) {
        let s = v.to_str().ok()?;
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(s);
    }
    let mut members: Vec<&str> = Vec::new();
    for m in joined.split(',') {
        let m = m.trim_matches([' ', '\t']);
        if m.is_empty() {
            continue;
        }
        let (key, value) = m.split_once('=')?;
        if !valid_key(key) || !valid_value(value) {
            return None;
        }
        if members
            .iter()
            .any(|o| o.split_once('=').is_some_and(|(k, _)| k == key))
        {
            return None;
        }
        members.push(m);
    }
    if members.is_empty() || members.len() > MAX_TRACESTATE_MEMBERS {
        return None;
    }
    let out = members.join(",");
    (out.len() <= MAX_TRACESTATE_BYTES).then_some(out)
}

fn valid_key(key: &str) -> bool {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/".contains(&c);
    let part = |p: &str, max: usize| {
        let b = p.as_bytes();
        !b.is_empty()
            && b.len() <= max
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter().all(|&c| ok(c))
    };
    match key.split_once('@') {
        None => key.as_bytes().first().is_some_and(u8::is_ascii_lowercase) && part(key, 256),
        Some((tenant, system)) => {
            part(tenant, 241)
                && system
                    .as_bytes()
                    .first()
                    .is_some_and(u8::is_ascii_lowercase)
                && part(system, 14)
        }
    }
}

fn valid_value(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b.last() != Some(&b' ')
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
}

/// A random trace id (never all zeroes).
pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

/// A random span id (never all zeroes).
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// A version-00 `traceparent` value.
pub fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> HeaderValue {
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    write_hex(&mut out[3..35], trace_id);
    out[35] = b'-';
    write_hex(&mut out[36..52], span_id);
    out[52] = b'-';
    write_hex(&mut out[53..55], &[flags]);
    // Only hex digits and dashes: always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static(""))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    write_hex(&mut out, bytes);
    String::from_utf8(out).unwrap_or_default()
}

fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_valid_traceparent() {
        let p = parse_traceparent(GOOD.as_bytes()).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled());
        assert_eq!(
            traceparent(&p.trace_id, &p.span_id, 1).as_bytes(),
            GOOD.as_bytes()
        );
        // A later version may carry more fields after a dash.
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-ever";
        assert!(!parse_traceparent(future.as_bytes()).unwrap().sampled());
    }

    #[test]
    fn refuses_every_malformed_traceparent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.append(&TRACEPARENT, HeaderValue::from_static(GOOD));
        assert!(parent(&h).is_some());
        h.append(&TRACEPARENT, HeaderValue::from_static(GOOD));
        assert!(parent(&h).is_none(), "two traceparent fields are ambiguous");
    }

    fn state(values: &[&str]) -> Option<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&TRACESTATE, HeaderValue::from_str(v).unwrap());
        }
        tracestate(&h)
    }

    #[test]
    fn tracestate_is_joined_checked_and_bounded() {
        assert_eq!(
            state(&["congo=t61rcWkgMzE", " rojo=00f067aa0ba902b7 ,"]).as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        assert_eq!(
            state(&["tenant@vendor=x"]).as_deref(),
            Some("tenant@vendor=x")
        );
        assert!(state(&[]).is_none());
        for bad in [
            "Upper=x", "a=b,a=c", "noequals", "a=", "a=x,y", "a=b=c", "a@b@c=x", "@v=x",
        ] {
            assert!(state(&[bad]).is_none(), "{bad:?}");
        }
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(state(&[&members.join(",")]).is_none(), "33 members");
        assert!(state(&[&members[..32].join(",")]).is_some(), "32 members");
        let long = format!(
            "a={},b={},c={}",
            "x".repeat(200),
            "y".repeat(200),
            "z".repeat(200)
        );
        assert!(state(&[&long]).is_none(), "over 512 bytes");
    }

    #[test]
    fn ids_are_never_zero_and_hex_is_lower_case() {
        for _ in 0..1000 {
            assert_ne!(new_trace_id(), [0; 16]);
            assert_ne!(new_span_id(), [0; 8]);
        }
        assert_eq!(hex(&[0xab, 0x01]), "ab01");
    }
}
