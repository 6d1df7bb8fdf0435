//! Compiled matchers: hosts, paths, predicates. Everything is parsed at compile time so that
//! matching is comparisons and (for regex forms) one automaton run.

use std::borrow::Cow;

use http::header::{COOKIE, HeaderName};
use http::{HeaderMap, Method};
use regex::Regex;
use turnpike_model::{PathMatch, PredicateTest};

use super::normalize::normalize_path;

/// Canonical host form shared by configuration and requests: no port, no IPv6 brackets, no
/// trailing dot, lower case. Borrows unless lower-casing is needed.
pub(super) fn canonical_host(host: &str) -> Cow<'_, str> {
    let host = host.trim();
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(inner, _)| inner)
    } else {
        match host.split_once(':') {
            // Exactly one colon: `name:port`. More colons: a bare IPv6 address, kept whole.
            Some((name, port)) if !port.contains(':') => name,
            _ => host,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// How specific a path matcher is; larger is more specific. Field order is comparison order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct PathRank {
    class: u8,
    primary: u32,
    secondary: u32,
}

impl PathRank {
    /// A route without paths.
    pub(super) const NONE: Self = Self {
        class: 0,
        primary: 0,
        secondary: 0,
    };
}

/// One compiled path matcher.
pub(super) enum PathMatcher {
    Exact(String),
    Prefix(String),
    Template(Template),
    Regex(Regex),
}

impl PathMatcher {
    /// Compiles one entry of `paths`; the error is a message for that entry.
    pub(super) fn compile(config: &PathMatch) -> Result<Self, String> {
        match config {
            PathMatch::Exact(p) => Ok(Self::Exact(normalize_pattern(p)?)),
            PathMatch::Prefix(p) => Ok(Self::Prefix(normalize_pattern(p)?)),
            PathMatch::Template(t) => Template::parse(&normalize_pattern(t)?).map(Self::Template),
            PathMatch::Regex(r) => {
                // Parsed alone first: a pattern like `a)|(b` would otherwise slip out of the
                // anchoring group and match anywhere.
                Regex::new(r)
                    .and_then(|_| Regex::new(&format!("^(?:{r})$")))
                    .map(Self::Regex)
                    .map_err(|e| format!("invalid regex: {e}"))
            }
        }
    }

    pub(super) fn rank(&self) -> PathRank {
        let (class, primary, secondary) = match self {
            Self::Exact(_) => (4, 0, 0),
            Self::Template(t) => (
                3,
                saturate(t.literals),
                u32::MAX - saturate(t.param_names().count()),
            ),
            Self::Regex(_) => (2, 0, 0),
            Self::Prefix(p) => (1, saturate(p.len()), 0),
        };
        PathRank {
            class,
            primary,
            secondary,
        }
    }

    /// Names of the parameters this matcher can capture.
    pub(super) fn param_names(&self) -> Vec<&str> {
        match self {
            Self::Exact(_) | Self::Prefix(_) => Vec::new(),
            Self::Template(t) => t.param_names().collect(),
            Self::Regex(r) => r.capture_names().flatten().collect(),
        }
    }

    pub(super) fn is_match(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) => prefix_matches(p, path),
            Self::Template(t) => t.matches(path, None),
            Self::Regex(r) => r.is_match(path),
        }
    }

    /// Appends the captured parameters of a path already known to match.
    pub(super) fn capture(&self, path: &str, params: &mut Vec<(String, String)>) {
        match self {
            Self::Exact(_) | Self::Prefix(_) => {}
            Self::Template(t) => {
                t.matches(path, Some(params));
            }
            Self::Regex(r) => {
                if let Some(caps) = r.captures(path) {
                    for (i, name) in r.capture_names().enumerate() {
                        if let (Some(name), Some(m)) = (name, caps.get(i)) {
                            params.push((name.to_owned(), m.as_str().to_owned()));
                        }
                    }
                }
            }
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Config paths go through the same normalisation as requests; otherwise `/a//b` or `/%7Ex`
/// in a config file would silently never match.
fn normalize_pattern(p: &str) -> Result<String, String> {
    normalize_path(p).map_err(|e| format!("invalid path `{p}`: {}", e.0))
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// A path template: `/users/{id}/files/{rest*}`.
pub(super) struct Template {
    segments: Vec<Segment>,
    literals: usize,
}

enum Segment {
    Literal(String),
    Param(String),
    /// `{name*}`: the remainder of the path, always last.
    Rest(String),
}

impl Template {
    fn parse(template: &str) -> Result<Self, String> {
        let body = template.strip_prefix('/').unwrap_or(template);
        let mut segments = Vec::new();
        let mut literals = 0;
        let parts: Vec<&str> = body.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            let inner = part.strip_prefix('{').and_then(|p| p.strip_suffix('}'));
            let segment = match inner {
                Some(inner) => {
                    let (name, rest) = match inner.strip_suffix('*') {
                        Some(name) => (name, true),
                        None => (inner, false),
                    };
                    check_param_name(name, template)?;
                    if segments
                        .iter()
                        .any(|s| matches!(s, Segment::Param(n) | Segment::Rest(n) if n == name))
                    {
                        return Err(format!("template `{template}` uses `{{{name}}}` twice"));
                    }
                    if rest && i + 1 != parts.len() {
                        return Err(format!(
                            "template `{template}`: `{{{name}*}}` must be the last segment"
                        ));
                    }
                    if rest {
                        Segment::Rest(name.to_owned())
                    } else {
                        Segment::Param(name.to_owned())
                    }
                }
                None if part.contains(['{', '}']) => {
                    return Err(format!(
                        "template `{template}`: `{{name}}` must be a whole segment"
                    ));
                }
                None => {
                    literals += 1;
                    Segment::Literal((*part).to_owned())
                }
            };
            segments.push(segment);
        }
        Ok(Self { segments, literals })
    }

    fn param_names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Literal(_) => None,
            Segment::Param(n) | Segment::Rest(n) => Some(n.as_str()),
        })
    }

    /// Matches without allocating unless `params` asks for the captures.
    fn matches(&self, path: &str, mut params: Option<&mut Vec<(String, String)>>) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut exhausted = false;
        for segment in &self.segments {
            if let Segment::Rest(name) = segment {
                if let Some(params) = params.as_mut() {
                    let value = if exhausted { "" } else { rest };
                    params.push((name.clone(), value.to_owned()));
                }
                return true;
            }
            if exhausted {
                return false;
            }
            let (current, next) = match rest.split_once('/') {
                Some((current, next)) => (current, Some(next)),
                None => (rest, None),
            };
            match segment {
                Segment::Literal(l) if l != current => return false,
                Segment::Param(_) if current.is_empty() => return false,
                Segment::Param(name) => {
                    if let Some(params) = params.as_mut() {
                        params.push((name.clone(), current.to_owned()));
                    }
                }
                _ => {}
            }
            match next {
                Some(next) => rest = next,
                None => exhausted = true,
            }
        }
        exhausted
    }
}

pub(super) fn check_param_name(name: &str, template: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "template `{template}`: `{{{name}}}` is not a valid parameter name (letters, digits, `_`, `-`)"
        ));
    }
    Ok(())
}

/// A compiled predicate test.
pub(super) enum Test {
    Equals(String),
    Prefix(String),
    Regex(Regex),
    Present,
    Absent,
}

impl Test {
    /// Compiles a test; the error names the field (`regex`, or empty for the whole entry).
    pub(super) fn compile(test: &PredicateTest) -> Result<Self, (&'static str, String)> {
        match test {
            PredicateTest::Equals(v) => Ok(Self::Equals(v.clone())),
            PredicateTest::Prefix(v) => Ok(Self::Prefix(v.clone())),
            PredicateTest::Regex(r) => Regex::new(r)
                .map(Self::Regex)
                .map_err(|e| (".regex", format!("invalid regex: {e}"))),
            PredicateTest::Present(true) => Ok(Self::Present),
            PredicateTest::Absent(true) => Ok(Self::Absent),
            PredicateTest::Present(false) | PredicateTest::Absent(false) => {
                Err(("", "`present`/`absent` must be `true`".to_owned()))
            }
        }
    }

    fn value_matches(&self, value: &str) -> bool {
        match self {
            Self::Equals(v) => value == v,
            Self::Prefix(v) => value.starts_with(v.as_str()),
            Self::Regex(r) => r.is_match(value),
            Self::Present | Self::Absent => true,
        }
    }

    /// Presence tests look at whether any value exists; value tests hold if any value passes.
    fn holds<S: AsRef<str>>(&self, mut values: impl Iterator<Item = S>) -> bool {
        match self {
            Self::Present => values.next().is_some(),
            Self::Absent => values.next().is_none(),
            _ => values.any(|v| self.value_matches(v.as_ref())),
        }
    }
}

/// A header predicate.
pub(super) struct HeaderPredicate {
    pub(super) name: HeaderName,
    pub(super) test: Test,
}

impl HeaderPredicate {
    pub(super) fn holds(&self, headers: &HeaderMap) -> bool {
        self.test.holds(
            headers
                .get_all(&self.name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes())),
        )
    }
}

/// A query or cookie predicate.
pub(super) struct NamedPredicate {
    pub(super) name: String,
    pub(super) test: Test,
}

impl NamedPredicate {
    pub(super) fn holds_query(&self, query: Option<&str>) -> bool {
        let pairs = query.unwrap_or("").split('&').filter(|p| !p.is_empty());
        self.test.holds(pairs.filter_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(name) == self.name.as_str()).then(|| form_decode(value))
        }))
    }

    pub(super) fn holds_cookie(&self, headers: &HeaderMap) -> bool {
        let pairs = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
            .flat_map(|v| v.split(';'));
        self.test.holds(pairs.filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            if name.trim() != self.name {
                return None;
            }
            let value = value.trim();
            // RFC 6265 allows the value to be wrapped in double quotes.
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            Some(value)
        }))
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; malformed
/// escapes are kept literally. Borrows when there is nothing to decode.
pub(super) fn form_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let mut ahead = bytes.clone();
                let hi = ahead.next().and_then(hex_value);
                let lo = ahead.next().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi << 4) | lo);
                        bytes = ahead;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Methods are compared exactly; configuration spellings are upper-cased so `get` means `GET`.
pub(super) fn parse_method(m: &str) -> Option<Method> {
    if m.is_empty() {
        return None;
    }
    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok()
}
