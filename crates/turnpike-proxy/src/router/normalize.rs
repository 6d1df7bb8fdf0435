//! Request path normalisation.
//!
//! Every matcher and every rewrite sees one canonical spelling of a path, so two spellings of
//! the same resource (`/a/../admin`, `//admin`, `/%61dmin`) cannot be routed differently, and
//! spellings that upstreams disagree about (encoded `/` and `\`) are refused outright.

use super::PathError;

/// Normalises a raw request path (no query): decodes percent-encoded unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`), upper-cases the hex of every other escape, merges duplicate slashes
/// and removes dot segments (RFC 3986 §5.2.4; `..` never climbs above the root). A trailing
/// slash is kept.
///
/// Refused, because upstreams decode them inconsistently and they are the usual tools of path
/// confusion attacks: a path not starting with `/`, encoded `/` (`%2F`) or `\` (`%5C`), a literal
/// `\`, NUL and other control characters (literal or encoded), and malformed escapes (`%zz`,
/// a truncated `%4`).
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError("path must start with `/`"));
    }
    // Almost every real path is already canonical: one scan, one copy.
    if is_canonical(raw) {
        return Ok(raw.to_owned());
    }
    let decoded = decode(raw)?;
    let mut out = String::with_capacity(decoded.len());
    remove_dot_segments(&decoded, &mut out);
    Ok(out)
}

/// True when `raw` has nothing to decode, merge or remove. Conservative: `/.well-known` takes
/// the slow path although it is canonical, which costs time, never correctness.
fn is_canonical(raw: &str) -> bool {
    let mut prev = 0u8;
    for &b in raw.as_bytes() {
        match b {
            b'%' | b'\\' => return false,
            // Non-ASCII goes to the slow path, which checks for Unicode control characters.
            0..=0x1f | 0x7f..=0xff => return false,
            b'/' | b'.' if prev == b'/' => return false,
            _ => {}
        }
        prev = b;
    }
    true
}

/// Decodes unreserved escapes and validates everything else; dot segments are left for
/// [`remove_dot_segments`] so that `%2E%2E` is treated exactly like `..`.
fn decode(raw: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' => {
                let hi = chars.next().and_then(hex_value);
                let lo = chars.next().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError("invalid percent-encoding"));
                };
                let byte = (hi << 4) | lo;
                match byte {
                    b'/' => return Err(PathError("encoded slash")),
                    b'\\' => return Err(PathError("encoded backslash")),
                    0 => return Err(PathError("encoded NUL")),
                    0x01..=0x1f | 0x7f => return Err(PathError("encoded control character")),
                    b if is_unreserved(b) => out.push(char::from(b)),
                    b => {
                        out.push('%');
                        out.push(hex_digit(b >> 4));
                        out.push(hex_digit(b & 0x0f));
                    }
                }
            }
            '\\' => return Err(PathError("backslash")),
            '\0' => return Err(PathError("NUL")),
            c if c.is_control() => return Err(PathError("control character")),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(c: char) -> Option<u8> {
    c.to_digit(16).and_then(|d| u8::try_from(d).ok())
}

fn hex_digit(n: u8) -> char {
    let n = n & 0x0f;
    char::from(if n < 10 { b'0' + n } else { b'A' + n - 10 })
}

/// Writes `path` (which starts with `/`) into `out` without empty, `.` and `..` segments.
/// A path that ended in a directory (`/`, `/.`, `/..`) keeps its trailing slash.
pub(super) fn remove_dot_segments(path: &str, out: &mut String) {
    out.clear();
    out.push('/');
    let rest = path.strip_prefix('/').unwrap_or(path);
    let mut segments = rest.split('/').peekable();
    // Invariant: `out` ends with `/` before each segment is handled.
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "" | "." => {}
            ".." => {
                if out.len() > 1 {
                    out.pop();
                    let cut = out.rfind('/').map_or(1, |i| i + 1);
                    out.truncate(cut);
                }
            }
            s => {
                out.push_str(s);
                if !last {
                    out.push('/');
                }
            }
        }
    }
}

/// Merges slashes and removes dot segments from a path built by a rewrite, so a rewrite can
/// never hand the upstream a path that climbs out of where the operator pointed it.
pub(super) fn clean_rewritten(path: String) -> String {
    let path = if path.starts_with('/') {
        path
    } else {
        let mut p = String::with_capacity(path.len() + 1);
        p.push('/');
        p.push_str(&path);
        p
    };
    if path.contains("//") || path.contains("/.") {
        let mut out = String::with_capacity(path.len());
        remove_dot_segments(&path, &mut out);
        out
    } else {
        path
    }
}
