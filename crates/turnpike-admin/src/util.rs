//! Small helpers: time formatting, JSON Merge Patch, hashing and key generation.

use ring::rand::SecureRandom;
use serde_json::{Map, Value};

use crate::error::{AdminError, AdminResult};

/// Formats milliseconds since the Unix epoch as an RFC 3339 UTC date-time with milliseconds.
/// Written out (Howard Hinnant's civil-from-days) rather than pulling a time library for one
/// conversion.
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Applies an RFC 7396 JSON Merge Patch: `null` deletes a member, objects merge recursively,
/// anything else (arrays included) replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(object) = target {
        for (key, value) in members {
            if value.is_null() {
                object.remove(key);
            } else {
                merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Rejects NUL characters anywhere in a JSON document: PostgreSQL cannot store them in
/// `jsonb`, and no field has a use for them. Reported as a validation error at their path.
pub(crate) fn reject_nul(value: &Value) -> AdminResult<()> {
    fn walk(value: &Value, path: &mut String) -> AdminResult<()> {
        match value {
            Value::String(s) if s.contains('\0') => Err(AdminError::validation(
                path.clone(),
                "NUL characters are not allowed",
            )),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    walk(item, path)?;
                    path.truncate(len);
                }
                Ok(())
            }
            Value::Object(members) => {
                for (key, item) in members {
                    if key.contains('\0') {
                        return Err(AdminError::validation(
                            path.clone(),
                            "NUL characters are not allowed in member names",
                        ));
                    }
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    walk(item, path)?;
                    path.truncate(len);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    walk(value, &mut String::new())
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]])
        .map(char::from)
        .collect()
}

/// SHA-256 of `text`, in hex: how API keys (and admin tokens, in the store) are kept.
pub(crate) use turnpike_store::sha256_hex;

/// `n` bytes from the OS random source.
pub(crate) fn random_bytes<const N: usize>() -> AdminResult<[u8; N]> {
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AdminError::internal("the OS random source failed"))?;
    Ok(bytes)
}

/// Turns arbitrary text into a name fragment: lower-case ASCII letters and digits, runs of
/// anything else collapsed into one `-`, no leading or trailing `-`.
pub(crate) fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_epoch_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The examples of RFC 7396, appendix A (a selection).
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, expected) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, expected, "patch {patch}");
        }
    }

    #[test]
    fn slugs_are_names() {
        assert_eq!(slug("/users/{id}/posts"), "users-id-posts");
        assert_eq!(slug("/"), "");
        assert_eq!(slug("/Ä/x"), "x");
    }

    #[test]
    fn nul_is_rejected_with_its_path() {
        let e = reject_nul(&json!({"a": [{"b": "x\u{0}"}]})).err();
        assert_eq!(e.and_then(|e| e.field).as_deref(), Some("a[0].b"));
        assert!(reject_nul(&json!({"a": "ok"})).is_ok());
    }
}
