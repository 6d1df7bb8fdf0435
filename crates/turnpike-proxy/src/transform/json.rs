//! Edits of a JSON document at JSON pointers (RFC 6901). Member order is kept (`serde_json`'s
//! `preserve_order`): a reshaped or converted document reads in the order it was written. Unlike RFC 6902 `add`, a missing
//! parent object is created, so `add /meta/tenant` works on a body without `meta`.

use serde_json::{Map, Value};

/// A pointer's reference tokens, unescaped (`~1` → `/`, `~0` → `~`).
fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

fn index(token: &str, len: usize, inserting: bool) -> Option<usize> {
    if token == "-" && inserting {
        return Some(len);
    }
    // RFC 6901: no leading zeros, no sign.
    if token.len() > 1 && token.starts_with('0') {
        return None;
    }
    let i: usize = token.parse().ok()?;
    let max = if inserting {
        len
    } else {
        len.saturating_sub(1)
    };
    (i <= max && (inserting || len > 0)).then_some(i)
}

/// Sets `value` at `pointer`, creating missing parent objects.
pub fn add(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    let tokens = tokens(pointer);
    let Some((last, parents)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    if doc.is_null() {
        *doc = Value::Object(Map::new());
    }
    let mut at = doc;
    for (i, t) in parents.iter().enumerate() {
        at = match at {
            Value::Object(m) => {
                let next = m.entry(t.clone()).or_insert(Value::Null);
                if next.is_null() {
                    *next = Value::Object(Map::new());
                }
                next
            }
            Value::Array(a) => {
                let len = a.len();
                let n = index(t, len, false)
                    .ok_or_else(|| format!("`{pointer}`: no index `{t}` in an array of {len}"))?;
                &mut a[n]
            }
            _ => return Err(not_container(pointer, &tokens[..i])),
        };
    }
    match at {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let len = a.len();
            let n = index(last, len, true)
                .ok_or_else(|| format!("`{pointer}`: no index `{last}` in an array of {len}"))?;
            a.insert(n, value);
        }
        _ => return Err(not_container(pointer, parents)),
    }
    Ok(())
}

fn not_container(pointer: &str, parent: &[String]) -> String {
    let parent: String = parent.iter().map(|t| format!("/{t}")).collect();
    format!("`{pointer}`: `{parent}` is neither an object nor an array")
}

/// Removes and returns the value at `pointer`, if there is one.
pub fn take(doc: &mut Value, pointer: &str) -> Option<Value> {
    let tokens = tokens(pointer);
    let (last, parents) = tokens.split_last()?;
    let mut at = doc;
    for t in parents {
        at = match at {
            Value::Object(m) => m.get_mut(t)?,
            Value::Array(a) => {
                let len = a.len();
                a.get_mut(index(t, len, false)?)?
            }
            _ => return None,
        };
    }
    match at {
        Value::Object(m) => m.shift_remove(last),
        Value::Array(a) => {
            let len = a.len();
            Some(a.remove(index(last, len, false)?))
        }
        _ => None,
    }
}

/// Renames the member at `pointer` to `to`, keeping its place among its siblings.
pub fn rename(doc: &mut Value, pointer: &str, to: &str) {
    let tokens = tokens(pointer);
    let Some((last, parents)) = tokens.split_last() else {
        return;
    };
    let parent: String = parents
        .iter()
        .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
        .collect();
    let Some(Value::Object(m)) = doc.pointer_mut(&parent) else {
        return;
    };
    let Some(pos) = m.keys().position(|k| k == last) else {
        return;
    };
    // Rebuilt in order: the member keeps its position, and a member already named `to`
    // is replaced.
    let old = std::mem::take(m);
    for (i, (k, v)) in old.into_iter().enumerate() {
        if i == pos {
            m.insert(to.to_owned(), v);
        } else if k != to {
            m.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn add_creates_parents_and_inserts_in_arrays() {
        let mut d = json!({"a": [1, 3]});
        add(&mut d, "/meta/tenant", json!("t1")).unwrap();
        add(&mut d, "/a/1", json!(2)).unwrap();
        add(&mut d, "/a/-", json!(4)).unwrap();
        add(&mut d, "/x~1y", json!(true)).unwrap();
        assert_eq!(
            d,
            json!({"a": [1, 2, 3, 4], "meta": {"tenant": "t1"}, "x/y": true})
        );
        assert!(
            add(&mut d, "/a/9", json!(0))
                .unwrap_err()
                .contains("no index")
        );
        assert!(
            add(&mut d, "/meta/tenant/x", json!(0))
                .unwrap_err()
                .contains("neither")
        );
        let mut null = Value::Null;
        add(&mut null, "/a", json!(1)).unwrap();
        assert_eq!(null, json!({"a": 1}));
    }

    #[test]
    fn take_and_rename() {
        let mut d = json!({"a": {"b": 1, "c": 2, "d": 3}, "l": [1, 2]});
        assert_eq!(take(&mut d, "/a/c"), Some(json!(2)));
        assert_eq!(take(&mut d, "/a/zz"), None);
        assert_eq!(take(&mut d, "/l/0"), Some(json!(1)));
        assert_eq!(take(&mut d, "/l/01"), None);
        rename(&mut d, "/a/b", "B");
        rename(&mut d, "/nope/b", "x");
        assert_eq!(d, json!({"a": {"B": 1, "d": 3}, "l": [2]}));
        assert_eq!(
            serde_json::to_string(&d["a"]).unwrap(),
            r#"{"B":1,"d":3}"#,
            "the renamed member keeps its place"
        );
    }
}
