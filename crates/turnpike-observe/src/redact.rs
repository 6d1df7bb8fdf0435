//! Redaction of sensitive data (`data_masking`): fields by JSON pointer or member name, and
//! values found in text by built-in detectors (Luhn-checked card numbers, emails, phone
//! numbers, national ids, IBANs) or by custom patterns. Used on response bodies by the proxy
//! and on captured bodies by the access log.

use std::borrow::Cow;
use std::collections::BTreeMap;

use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};
use turnpike_model::policy::{DataMaskingConfig, Detector, MaskAction};

/// What replaces a removed match inside text, or a masked object or array.
pub const REDACTED: &str = "[REDACTED]";

/// A compiled `data_masking` policy.
#[derive(Debug)]
pub struct Redactor {
    pointers: Vec<(Vec<String>, MaskAction)>,
    names: Vec<(String, MaskAction)>,
    finders: Vec<Finder>,
    keep: usize,
    salt: String,
    /// Largest body masked.
    pub max_bytes: u64,
    content_types: Vec<String>,
    /// Whether captured bodies in the access log are masked too.
    pub logs: bool,
}

#[derive(Debug)]
struct Finder {
    kind: Kind,
    regex: Regex,
    action: MaskAction,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Card,
    Email,
    IntlPhone,
    Phone,
    Ssn,
    Nino,
    Iban,
    Pattern,
}

impl Kind {
    /// Whether a regex match really is one (checksums, number rules, boundaries).
    fn accepts(self, text: &str, start: usize, m: &str) -> bool {
        let digits: Vec<u32> = m.chars().filter_map(|c| c.to_digit(10)).collect();
        match self {
            Kind::Card => (13..=19).contains(&digits.len()) && luhn(&digits),
            Kind::IntlPhone => {
                (8..=15).contains(&digits.len()) && !number_continues(text, start, m.len())
            }
            Kind::Phone => digits.len() == 10 && !number_continues(text, start, m.len()),
            Kind::Ssn => {
                let area = digits.iter().take(3).fold(0, |a, d| a * 10 + d);
                let group = digits.iter().skip(3).take(2).fold(0, |a, d| a * 10 + d);
                let serial = digits.iter().skip(5).fold(0, |a, d| a * 10 + d);
                area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
            }
            Kind::Nino => {
                let prefix: String = m.chars().take(2).collect();
                !["BG", "GB", "KN", "NK", "NT", "TN", "ZZ"].contains(&prefix.as_str())
            }
            Kind::Iban => iban_ok(m),
            Kind::Email | Kind::Pattern => true,
        }
    }
}

impl Kind {
    /// The longest run of whole groups inside `text[s..e]` that passes the check, leftmost
    /// first (cards and IBANs, whose regexes can take in neighbouring groups).
    fn sub_match(self, text: &str, s: usize, e: usize) -> Option<(usize, usize)> {
        if !matches!(self, Kind::Card | Kind::Iban) {
            return None;
        }
        let m = text.get(s..e)?;
        // Runs of letters and digits, as byte ranges of `m` (separators may be multi-byte).
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut open: Option<usize> = None;
        for (i, c) in m.char_indices() {
            match (c.is_alphanumeric(), open) {
                (true, None) => open = Some(i),
                (false, Some(a)) => {
                    groups.push((a, i));
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(a) = open {
            groups.push((a, m.len()));
        }
        for i in 0..groups.len() {
            for j in (i + 1..groups.len()).rev() {
                let (a, b) = (s + groups[i].0, s + groups[j].1);
                let candidate = text.get(a..b)?;
                // The whole run was already refused.
                if (a, b) != (s, e) && self.accepts(text, a, candidate) {
                    return Some((a, b));
                }
            }
            // A single group can be a whole unspaced value too.
            let (a, b) = (s + groups[i].0, s + groups[i].1);
            if (a, b) != (s, e)
                && let Some(candidate) = text.get(a..b)
                && self.accepts(text, a, candidate)
            {
                return Some((a, b));
            }
        }
        None
    }
}

/// Whether digits go on around `text[start..start+len]` through a `.` (an address or a
/// version, not a phone number).
fn number_continues(text: &str, start: usize, len: usize) -> bool {
    let before = text.get(..start).unwrap_or("");
    let after = text.get(start + len..).unwrap_or("");
    let b: Vec<char> = before.chars().rev().take(2).collect();
    let a: Vec<char> = after.chars().take(2).collect();
    let digit_dot = |v: &[char]| {
        v.first().is_some_and(char::is_ascii_digit)
            || (v.first() == Some(&'.') && v.get(1).is_some_and(char::is_ascii_digit))
    };
    digit_dot(&b) || digit_dot(&a)
}

fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

fn iban_ok(m: &str) -> bool {
    let compact: String = m.chars().filter(|c| !c.is_whitespace()).collect();
    // Two letters (the country), two check digits, then letters and digits.
    let shaped = compact.len() >= 4
        && compact.bytes().take(2).all(|b| b.is_ascii_uppercase())
        && compact.bytes().skip(2).take(2).all(|b| b.is_ascii_digit())
        && compact.bytes().all(|b| b.is_ascii_alphanumeric());
    if !shaped || !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u64 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c.to_digit(36) {
            Some(v) => v as u64,
            None => return false,
        };
        rem = if v < 10 {
            (rem * 10 + v) % 97
        } else {
            (rem * 100 + v) % 97
        };
    }
    rem == 1
}

fn detector_regexes(d: Detector) -> Vec<(Kind, &'static str)> {
    match d {
        Detector::Card => vec![(Kind::Card, r"\b\d(?:[ -]?\d){12,18}\b")],
        Detector::Email => vec![(
            Kind::Email,
            r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}\b",
        )],
        Detector::Phone => vec![
            (
                Kind::IntlPhone,
                r"\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,6}",
            ),
            (
                Kind::Phone,
                r"(?:\(\d{3}\) ?|\b\d{3}[-. ])\d{3}[-. ]\d{4}\b",
            ),
        ],
        Detector::NationalId => vec![
            (Kind::Ssn, r"\b\d{3}-\d{2}-\d{4}\b"),
            (
                Kind::Nino,
                r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b",
            ),
        ],
        Detector::Iban => vec![(Kind::Iban, r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")],
    }
}

impl Redactor {
    /// Compiles `cfg` (checked when it was parsed; a bad pattern names its field).
    pub fn new(cfg: &DataMaskingConfig) -> Result<Self, (String, String)> {
        let mut finders = Vec::new();
        // Specific detectors first: a card number is not also taken for a phone number.
        let order = [
            Detector::Card,
            Detector::Iban,
            Detector::NationalId,
            Detector::Email,
            Detector::Phone,
        ];
        for d in order.into_iter().filter(|d| cfg.detectors.contains(d)) {
            for (kind, re) in detector_regexes(d) {
                let regex = Regex::new(re).map_err(|e| ("detectors".to_owned(), e.to_string()))?;
                finders.push(Finder {
                    kind,
                    regex,
                    action: cfg.action,
                });
            }
        }
        for (i, p) in cfg.patterns.iter().enumerate() {
            let regex = turnpike_model::policy::user_regex(&p.regex)
                .map_err(|e| (format!("patterns[{i}].regex"), e))?;
            finders.push(Finder {
                kind: Kind::Pattern,
                regex,
                action: p.action.unwrap_or(cfg.action),
            });
        }
        let mut pointers = Vec::new();
        let mut names = Vec::new();
        for f in &cfg.fields {
            let action = f.action.unwrap_or(cfg.action);
            if let Some(p) = &f.path {
                let tokens = p
                    .split('/')
                    .skip(1)
                    .map(|t| t.replace("~1", "/").replace("~0", "~"))
                    .collect();
                pointers.push((tokens, action));
            }
            if let Some(n) = &f.name {
                names.push((n.clone(), action));
            }
        }
        Ok(Self {
            pointers,
            names,
            finders,
            keep: cfg.keep,
            salt: cfg.hash_salt.clone(),
            max_bytes: cfg.max_bytes,
            content_types: cfg
                .content_types
                .iter()
                .map(|t| t.to_ascii_lowercase())
                .collect(),
            logs: cfg.logs,
        })
    }

    /// Whether a body of media type `media` (lower case, no parameters) is masked, and how:
    /// `Some(true)` as JSON, `Some(false)` as text.
    pub fn treats(&self, media: &str) -> Option<bool> {
        // An event stream is never buffered whole: it would stop streaming.
        if media == "text/event-stream" {
            return None;
        }
        let (ty, sub) = media.split_once('/')?;
        let listed = self.content_types.iter().any(|p| {
            let Some((pty, psub)) = p.split_once('/') else {
                return false;
            };
            (pty == ty || (pty == "*" && psub == "*"))
                && (psub == "*"
                    || psub == sub
                    || psub
                        .strip_prefix('*')
                        .is_some_and(|suffix| sub.ends_with(suffix)))
        });
        listed.then(|| sub == "json" || sub.ends_with("+json"))
    }

    /// Masks a body of media type `media` (`None`: no `Content-Type`, masked as text): JSON
    /// value by value, text as a whole. `Ok(None)` when the body is not of a masked type. A
    /// body claiming JSON that does not parse is an error: its fields could not be found, so
    /// it must not be sent.
    pub fn redact_body(&self, media: Option<&str>, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let json = match media {
            Some(m) => match self.treats(m) {
                Some(json) => json,
                None => return Ok(None),
            },
            None => false,
        };
        if json {
            let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
            let mut v: Value = serde_json::from_slice(body)
                .map_err(|e| format!("a JSON body to mask does not parse: {e}"))?;
            self.redact_json(&mut v);
            return serde_json::to_vec(&v).map(Some).map_err(|e| e.to_string());
        }
        let text = String::from_utf8_lossy(body);
        Ok(Some(self.redact_text(&text).into_owned().into_bytes()))
    }

    /// Whether fields are masked by path or name (which only a parsed document allows).
    pub fn has_fields(&self) -> bool {
        !self.pointers.is_empty() || !self.names.is_empty()
    }

    /// Masks a JSON document in place.
    pub fn redact_json(&self, v: &mut Value) {
        for (tokens, action) in &self.pointers {
            self.at_pointer(v, tokens, *action);
        }
        self.walk(v);
    }

    fn at_pointer(&self, v: &mut Value, tokens: &[String], action: MaskAction) {
        let Some((first, rest)) = tokens.split_first() else {
            return;
        };
        let last = rest.is_empty();
        match v {
            Value::Object(m) => {
                if last && action == MaskAction::Remove {
                    if first == "*" {
                        m.clear();
                    } else {
                        m.shift_remove(first.as_str());
                    }
                    return;
                }
                for (k, child) in m.iter_mut() {
                    if first == "*" || k == first {
                        if last {
                            *child = self.masked(child, action);
                        } else {
                            self.at_pointer(child, rest, action);
                        }
                    }
                }
            }
            Value::Array(items) => {
                let index = first.parse::<usize>().ok();
                if last && action == MaskAction::Remove {
                    match (first.as_str(), index) {
                        ("*", _) => items.clear(),
                        (_, Some(i)) if i < items.len() => {
                            items.remove(i);
                        }
                        _ => {}
                    }
                    return;
                }
                for (i, child) in items.iter_mut().enumerate() {
                    if first == "*" || index == Some(i) {
                        if last {
                            *child = self.masked(child, action);
                        } else {
                            self.at_pointer(child, rest, action);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn walk(&self, v: &mut Value) {
        match v {
            Value::Object(m) => {
                if !self.names.is_empty() {
                    m.retain(|k, _| {
                        !self
                            .names
                            .iter()
                            .any(|(n, a)| n.eq_ignore_ascii_case(k) && *a == MaskAction::Remove)
                    });
                }
                for (k, child) in m.iter_mut() {
                    match self.names.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)) {
                        Some((_, action)) => *child = self.masked(child, *action),
                        None => self.walk(child),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|c| self.walk(c)),
            Value::String(s) => {
                if let Cow::Owned(masked) = self.redact_text(s) {
                    *s = masked;
                }
            }
            // A card number sent as a JSON number is still a card number.
            Value::Number(n) => {
                if let Cow::Owned(masked) = self.redact_text(&n.to_string()) {
                    *v = Value::String(masked);
                }
            }
            _ => {}
        }
    }

    /// A field's masked value (`remove` is done by the caller).
    fn masked(&self, v: &Value, action: MaskAction) -> Value {
        let text: Cow<'_, str> = match v {
            Value::String(s) => Cow::Borrowed(s),
            Value::Number(_) | Value::Bool(_) => Cow::Owned(v.to_string()),
            Value::Null => return Value::Null,
            _ if action == MaskAction::Hash => Cow::Owned(v.to_string()),
            _ => return Value::String(REDACTED.into()),
        };
        Value::String(match action {
            MaskAction::Hash => self.hash(&text),
            MaskAction::Remove => REDACTED.into(),
            MaskAction::Partial => self.partial(&text, looks_like_email(&text)),
        })
    }

    fn hash(&self, text: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.salt.as_bytes());
        h.update(text.as_bytes());
        let digest = h.finalize();
        format!("sha256:{}", hex::encode(&digest[..8]))
    }

    /// Masks every letter and digit but the last `keep` (an email: all of its local part
    /// but the first character, and none of its domain).
    fn partial(&self, text: &str, email: bool) -> String {
        if email && let Some((local, domain)) = text.split_once('@') {
            let first: String = local.chars().take(1).collect();
            return format!("{first}***@{domain}");
        }
        let total = text.chars().filter(|c| c.is_alphanumeric()).count();
        // A value no longer than what would be kept (a CVV, a PIN) is masked whole.
        let mask = if total <= self.keep {
            total
        } else {
            total - self.keep
        };
        let mut seen = 0;
        text.chars()
            .map(|c| {
                if c.is_alphanumeric() {
                    seen += 1;
                    if seen <= mask { '*' } else { c }
                } else {
                    c
                }
            })
            .collect()
    }

    /// Masks what the detectors and patterns find in `text`.
    pub fn redact_text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if self.finders.is_empty() {
            return Cow::Borrowed(text);
        }
        // start → (end, kind, action); spans never overlap, so the one starting last before
        // a candidate's end is the only one that can overlap it.
        let mut spans: BTreeMap<usize, (usize, Kind, MaskAction)> = BTreeMap::new();
        let free = |spans: &BTreeMap<usize, (usize, Kind, MaskAction)>, s: usize, e: usize| {
            spans
                .range(..e)
                .next_back()
                .is_none_or(|(_, (end, _, _))| *end <= s)
        };
        for f in &self.finders {
            let mut at = 0;
            while let Some(m) = f.regex.find_at(text, at) {
                let (s, e) = (m.start(), m.end());
                if m.is_empty() {
                    at = next_char(text, s);
                    continue;
                }
                // A greedy match can take in a neighbour (`qty 2 4111...`, `... 12/27`):
                // when the whole fails its check, its sub-runs of groups are tried.
                let found = if f.kind.accepts(text, s, m.as_str()) {
                    Some((s, e))
                } else {
                    f.kind.sub_match(text, s, e)
                };
                match found {
                    Some((s, e)) => {
                        if free(&spans, s, e) {
                            spans.insert(s, (e, f.kind, f.action));
                        }
                        at = e;
                    }
                    // Nothing here: look again from the next group, so a value that starts
                    // inside this match is still seen.
                    None => at = next_group(text, s, e),
                }
            }
        }
        if spans.is_empty() {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (s, (e, kind, action)) in spans {
            out.push_str(text.get(at..s).unwrap_or(""));
            let found = text.get(s..e).unwrap_or("");
            match action {
                MaskAction::Remove => out.push_str(REDACTED),
                MaskAction::Hash => out.push_str(&self.hash(found)),
                MaskAction::Partial => out.push_str(&self.partial(found, kind == Kind::Email)),
            }
            at = e;
        }
        out.push_str(text.get(at..).unwrap_or(""));
        Cow::Owned(out)
    }
}

/// The byte after the character at `i`.
fn next_char(text: &str, i: usize) -> usize {
    text.get(i..)
        .and_then(|r| r.chars().next())
        .map_or(text.len(), |c| i + c.len_utf8())
}

/// Where the second group of `text[s..e]` starts (after the first run of letters and
/// digits and the separators after it), or the next character when there is one group.
fn next_group(text: &str, s: usize, e: usize) -> usize {
    let m = text.get(s..e).unwrap_or("");
    let first = m.find(|c: char| !c.is_alphanumeric()).unwrap_or(m.len());
    let second = m
        .get(first..)
        .and_then(|r| r.find(char::is_alphanumeric))
        .map(|i| first + i);
    match second {
        Some(i) if i > 0 => s + i,
        _ => next_char(text, s),
    }
}

fn looks_like_email(s: &str) -> bool {
    s.split_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !s.contains(char::is_whitespace))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use turnpike_model::policy::{MaskField, MaskPattern};

    fn with(detectors: &[Detector]) -> Redactor {
        Redactor::new(&DataMaskingConfig {
            detectors: detectors.to_vec(),
            ..DataMaskingConfig::default()
        })
        .unwrap()
    }

    /// Each detector on samples it must find and samples it must leave alone.
    #[test]
    fn detectors_on_positive_and_negative_samples() {
        // (detector, [(input, masked)], [inputs left alone])
        type Case<'a> = (Detector, &'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case<'_>] = &[
            (
                Detector::Card,
                &[
                    ("card 4111 1111 1111 1111 ok", "card **** **** **** 1111 ok"),
                    ("4111-1111-1111-1111", "****-****-****-1111"),
                    ("5500005555555559", "************5559"),
                    ("amex 378282246310005.", "amex ***********0005."),
                ],
                &[
                    "4111 1111 1111 1112",         // fails Luhn
                    "order 1234567890123 shipped", // fails Luhn
                    "id 411111111111",             // too short
                    "2024-01-15",
                ],
            ),
            (
                Detector::Email,
                &[
                    ("mail ada@example.com now", "mail a***@example.com now"),
                    ("<j.doe+x@mail.co.uk>", "<j***@mail.co.uk>"),
                ],
                &["user@localhost", "a@b", "@handle", "x@y.z"],
            ),
            (
                Detector::Phone,
                &[
                    ("call +44 20 7946 0958 today", "call +** ** **** 0958 today"),
                    ("+14155550123", "+*******0123"),
                    ("(415) 555-0123", "(***) ***-0123"),
                    ("415-555-0123", "***-***-0123"),
                ],
                &[
                    "192.168.100.200",
                    "version 1.2.3",
                    "2024-01-15 10:30",
                    "ref 12345",
                    "+12",
                    "10.415.555.0123.1",
                ],
            ),
            (
                Detector::NationalId,
                &[
                    ("ssn 123-45-6789", "ssn ***-**-6789"),
                    ("NI JG 10 37 59 A", "NI ** ** *7 59 A"),
                    ("AB123456D", "*****456D"),
                ],
                &[
                    "000-12-3456",
                    "666-12-3456",
                    "912-34-5678",
                    "123-00-4567",
                    "123-45-0000",
                    "GB123456A",
                    "QQ123456C", // Q is never a first letter
                    "AB123456E",
                    "1234-56-789",
                ],
            ),
            (
                Detector::Iban,
                &[
                    ("GB82 WEST 1234 5698 7654 32", "**** **** **** **** **54 32"),
                    ("DE89370400440532013000", "******************3000"),
                ],
                &["GB82 WEST 1234 5698 7654 33", "XX00 1234"],
            ),
        ];
        for (d, positive, negative) in cases {
            let r = with(&[*d]);
            for (input, want) in *positive {
                assert_eq!(r.redact_text(input), *want, "{d:?} should mask {input:?}");
            }
            for input in *negative {
                assert_eq!(
                    r.redact_text(input),
                    *input,
                    "{d:?} should not touch {input:?}"
                );
            }
        }
    }

    #[test]
    fn values_next_to_other_groups_are_still_found() {
        let r = with(&[Detector::Card, Detector::Iban]);
        for (input, want) in [
            ("4111 1111 1111 1111 12/27", "**** **** **** 1111 12/27"),
            ("qty 2 4111111111111111", "qty 2 ************1111"),
            ("4111111111111111 1", "************1111 1"),
            ("ref 12-4111-1111-1111-1111", "ref 12-****-****-****-1111"),
            (
                "4111111111111111 5500005555555559",
                "************1111 ************5559",
            ),
            ("DE89370400440532013000 OK", "******************3000 OK"),
            (
                "GB82 WEST 1234 5698 7654 32 BIC NWBKGB2L",
                "**** **** **** **** **54 32 BIC NWBKGB2L",
            ),
        ] {
            assert_eq!(r.redact_text(input), want, "{input}");
        }
        let r = with(&[Detector::Phone]);
        assert_eq!(r.redact_text("10:30:00 +0100 2024"), "10:30:00 +0100 2024");
    }

    #[test]
    fn numbers_short_values_and_names_in_any_case() {
        let r = Redactor::new(&DataMaskingConfig {
            fields: vec![
                MaskField {
                    path: None,
                    name: Some("cvv".into()),
                    action: None,
                },
                MaskField {
                    path: None,
                    name: Some("pin".into()),
                    action: None,
                },
                MaskField {
                    path: None,
                    name: Some("password".into()),
                    action: Some(MaskAction::Remove),
                },
            ],
            detectors: vec![Detector::Card],
            ..DataMaskingConfig::default()
        })
        .unwrap();
        let mut v =
            json!({"cvv": "123", "PIN": 1234, "Password": "x", "card": 4111111111111111u64});
        r.redact_json(&mut v);
        assert_eq!(
            v,
            json!({"cvv": "***", "PIN": "****", "card": "************1111"})
        );
    }

    #[test]
    fn many_matches() {
        // Spans are kept in a map: each match costs a lookup, not a scan of the others.
        let r = with(&[Detector::Email]);
        let text = "a@example.com ".repeat(20_000);
        let out = r.redact_text(&text);
        assert_eq!(out.matches("a***@example.com").count(), 20_000);
    }

    #[test]
    fn cards_are_not_taken_for_phones() {
        let r = with(&[Detector::Phone, Detector::Card]);
        assert_eq!(
            r.redact_text("4111 1111 1111 1111 / +1 415 555 0123"),
            "**** **** **** 1111 / +* *** *** 0123"
        );
    }

    #[test]
    fn fields_by_pointer_and_name_with_each_action() {
        let r = Redactor::new(&DataMaskingConfig {
            fields: vec![
                MaskField {
                    path: Some("/user/ssn".into()),
                    name: None,
                    action: Some(MaskAction::Remove),
                },
                MaskField {
                    path: Some("/users/*/card".into()),
                    name: None,
                    action: None,
                },
                MaskField {
                    path: None,
                    name: Some("password".into()),
                    action: Some(MaskAction::Remove),
                },
                MaskField {
                    path: None,
                    name: Some("token".into()),
                    action: Some(MaskAction::Hash),
                },
                MaskField {
                    path: None,
                    name: Some("address".into()),
                    action: None,
                },
            ],
            detectors: vec![Detector::Email],
            patterns: vec![MaskPattern {
                regex: "sk_live_[a-z0-9]+".into(),
                action: Some(MaskAction::Remove),
            }],
            hash_salt: "s".into(),
            ..DataMaskingConfig::default()
        })
        .unwrap();
        let mut v = json!({
            "user": {"ssn": "123-45-6789", "email": "ada@example.com", "password": "p"},
            "users": [{"card": "4111111111111111"}, {"card": 12345678}],
            "token": "abc", "deep": [{"password": "q", "note": "key sk_live_abc123 here"}],
            "address": {"street": "1 Main St"},
        });
        r.redact_json(&mut v);
        let hash = r.hash("abc");
        assert!(hash.starts_with("sha256:") && hash.len() == 7 + 16);
        assert_eq!(
            v,
            json!({
                "user": {"email": "a***@example.com"},
                "users": [{"card": "************1111"}, {"card": "****5678"}],
                "token": hash, "deep": [{"note": "key [REDACTED] here"}],
                "address": "[REDACTED]",
            })
        );
        // Stable pseudonyms: the same value hashes the same.
        assert_eq!(r.hash("abc"), hash);
    }

    #[test]
    fn bodies_by_media_type() {
        let r = with(&[Detector::Email]);
        assert_eq!(r.treats("application/json"), Some(true));
        assert_eq!(r.treats("application/problem+json"), Some(true));
        assert_eq!(r.treats("text/plain"), Some(false));
        assert_eq!(r.treats("image/png"), None);
        assert_eq!(r.treats("text/event-stream"), None);
        let masked =
            |media: Option<&str>, body: &[u8]| r.redact_body(media, body).unwrap().unwrap();
        assert_eq!(
            masked(Some("text/plain"), b"to ada@example.com"),
            b"to a***@example.com"
        );
        assert_eq!(
            masked(None, b"to ada@example.com"),
            b"to a***@example.com",
            "no type: text"
        );
        assert_eq!(
            r.redact_body(Some("image/png"), b"ada@example.com")
                .unwrap(),
            None
        );
        assert_eq!(
            masked(
                Some("application/json"),
                b"\xEF\xBB\xBF{\"a\": \"ada@example.com\"}"
            ),
            br#"{"a":"a***@example.com"}"#
        );
        // JSON that does not parse cannot be masked field by field: refused.
        for bad in [&br#"{"a": "ada@example.com"#[..], br#"{"a":1}{"b":2}"#] {
            assert!(r.redact_body(Some("application/json"), bad).is_err());
        }
    }
}
