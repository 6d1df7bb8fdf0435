//! XML ↔ JSON, by the mapping of [`XmlOptions`]: an element is an object keyed by its
//! children's names, attributes are prefixed keys, text beside attributes or children sits
//! under the text key, an element with only text is that text, and repeated children are an
//! array. Element order is kept.
//!
//! Only what a document says is read: DTDs are refused (no entity can be declared, so none
//! can expand), and nesting is bounded.

use std::fmt::Write as _;

use quick_xml::escape::escape;
use quick_xml::events::{BytesStart, Event};
use serde_json::{Map, Value};
use turnpike_model::policy::XmlOptions;

/// Deepest element nesting read.
const MAX_DEPTH: usize = 128;

const SOAP11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const SOAP12: &str = "http://www.w3.org/2003/05/soap-envelope";

struct Frame {
    name: String,
    fields: Map<String, Value>,
    text: String,
    has_children: bool,
}

impl Frame {
    fn new(start: &BytesStart<'_>, o: &XmlOptions) -> Result<Self, String> {
        let mut fields = Map::new();
        for a in start.attributes() {
            let a = a.map_err(|e| format!("bad attribute: {e}"))?;
            let key =
                std::str::from_utf8(a.key.as_ref()).map_err(|_| "attribute name is not UTF-8")?;
            if o.strip_namespaces && (key == "xmlns" || key.starts_with("xmlns:")) {
                continue;
            }
            let value = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| format!("bad attribute `{key}`: {e}"))?;
            let key = format!("{}{}", o.attribute_prefix, local(key, o));
            fields.insert(key, scalar(&value, o));
        }
        let name = std::str::from_utf8(start.name().as_ref())
            .map_err(|_| "element name is not UTF-8")?
            .to_owned();
        Ok(Self {
            name: local(&name, o).to_owned(),
            fields,
            text: String::new(),
            has_children: false,
        })
    }

    fn into_value(mut self, o: &XmlOptions) -> (String, Value) {
        let value = if self.fields.is_empty() && !self.has_children {
            scalar(&self.text, o)
        } else {
            let text = self.text.trim();
            if !text.is_empty() {
                self.fields.insert(o.text_key.clone(), scalar(text, o));
            }
            Value::Object(self.fields)
        };
        (self.name, value)
    }

    fn add_child(&mut self, name: String, value: Value, o: &XmlOptions) {
        self.has_children = true;
        let always_array = o.arrays.contains(&name);
        match self.fields.get_mut(&name) {
            // An element's own value is never an array: an array here holds repeats.
            Some(Value::Array(items)) => items.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
            None if always_array => {
                self.fields.insert(name, Value::Array(vec![value]));
            }
            None => {
                self.fields.insert(name, value);
            }
        }
    }
}

fn local<'a>(name: &'a str, o: &XmlOptions) -> &'a str {
    if o.strip_namespaces {
        name.rsplit_once(':').map_or(name, |(_, l)| l)
    } else {
        name
    }
}

/// Text as JSON: typed when `infer_types` and the text is exactly a JSON number or boolean;
/// empty as `null`.
fn scalar(text: &str, o: &XmlOptions) -> Value {
    if !o.infer_types {
        return Value::String(text.to_owned());
    }
    match text {
        "" => Value::Null,
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => {
            if text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
                && let Ok(n) = text.parse::<serde_json::Number>()
                && n.to_string() == text
            {
                return Value::Number(n);
            }
            Value::String(text.to_owned())
        }
    }
}

/// Reads an XML document into JSON: `{"<root element>": <its value>}`.
pub fn to_json(xml: &[u8], o: &XmlOptions) -> Result<Value, String> {
    let text = std::str::from_utf8(xml).map_err(|_| "the XML body is not UTF-8".to_owned())?;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<(String, Value)> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("invalid XML at byte {}: {e}", reader.error_position()))?;
        match event {
            Event::Start(s) => {
                if root.is_some() {
                    return Err("more than one root element".into());
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(format!("elements nested deeper than {MAX_DEPTH}"));
                }
                stack.push(Frame::new(&s, o)?);
            }
            Event::Empty(s) => {
                if root.is_some() {
                    return Err("more than one root element".into());
                }
                let (name, value) = Frame::new(&s, o)?.into_value(o);
                match stack.last_mut() {
                    Some(parent) => parent.add_child(name, value, o),
                    None => root = Some((name, value)),
                }
            }
            Event::End(_) => {
                let Some(frame) = stack.pop() else {
                    return Err("unexpected end tag".into());
                };
                let (name, value) = frame.into_value(o);
                match stack.last_mut() {
                    Some(parent) => parent.add_child(name, value, o),
                    None => root = Some((name, value)),
                }
            }
            Event::Text(t) => {
                let s = t
                    .xml10_content()
                    .map_err(|e| format!("invalid XML text: {e}"))?;
                push_text(&mut stack, &s)?;
            }
            Event::CData(t) => {
                let s = t.decode().map_err(|e| format!("invalid XML text: {e}"))?;
                push_text(&mut stack, &s)?;
            }
            Event::GeneralRef(r) => {
                let s = match r
                    .resolve_char_ref()
                    .map_err(|e| format!("invalid XML: {e}"))?
                {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| format!("invalid XML: {e}"))?;
                        match &*name {
                            "lt" => "<".into(),
                            "gt" => ">".into(),
                            "amp" => "&".into(),
                            "apos" => "'".into(),
                            "quot" => "\"".into(),
                            other => return Err(format!("unknown entity `&{other};`")),
                        }
                    }
                };
                push_text(&mut stack, &s)?;
            }
            Event::DocType(_) => return Err("XML with a DTD is not accepted".into()),
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err("the XML document ends inside an element".into());
    }
    let (name, value) = root.ok_or("the XML body has no element")?;
    let mut doc = Map::new();
    doc.insert(name, value);
    Ok(Value::Object(doc))
}

fn push_text(stack: &mut [Frame], s: &str) -> Result<(), String> {
    match stack.last_mut() {
        Some(f) => {
            f.text.push_str(s);
            Ok(())
        }
        None if s.trim().is_empty() => Ok(()),
        None => Err("text outside the root element".into()),
    }
}

/// Writes JSON as an XML document. An object with one member (not an attribute or text)
/// is that element; anything else goes under [`XmlOptions::root`], an array's items as
/// `item` elements.
pub fn from_json(v: &Value, o: &XmlOptions) -> Result<String, String> {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let soap = o
        .soap
        .as_deref()
        .map(|v| if v == "1.2" { SOAP12 } else { SOAP11 });
    if let Some(ns) = soap {
        let _ = write!(out, "<soap:Envelope xmlns:soap=\"{ns}\"><soap:Body>");
    }
    match v {
        // One member that is not an array: it is the root element. (An array member would
        // be several roots.)
        Value::Object(m)
            if m.len() == 1
                && m.iter().all(|(k, v)| {
                    !k.starts_with(&o.attribute_prefix) && *k != o.text_key && !v.is_array()
                }) =>
        {
            for (k, v) in m {
                element(&mut out, k, v, o, 0)?;
            }
        }
        Value::Array(items) => {
            let _ = write!(out, "<{}>", o.root);
            for item in items {
                element(&mut out, "item", item, o, 1)?;
            }
            let _ = write!(out, "</{}>", o.root);
        }
        other => element(&mut out, &o.root, other, o, 0)?,
    }
    if soap.is_some() {
        out.push_str("</soap:Body></soap:Envelope>");
    }
    Ok(out)
}

fn element(
    out: &mut String,
    name: &str,
    v: &Value,
    o: &XmlOptions,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("JSON nested deeper than {MAX_DEPTH}"));
    }
    if !is_xml_name(name) {
        return Err(format!("`{name}` is not an XML element name"));
    }
    match v {
        Value::Array(items) => {
            for item in items {
                element(out, name, item, o, depth + 1)?;
            }
        }
        Value::Null => {
            let _ = write!(out, "<{name}/>");
        }
        Value::Object(m) => {
            let _ = write!(out, "<{name}");
            for (k, v) in m {
                if let Some(attr) = k.strip_prefix(&o.attribute_prefix) {
                    if !is_xml_name(attr) {
                        return Err(format!("`{attr}` is not an XML attribute name"));
                    }
                    let _ = write!(out, " {attr}=\"{}\"", escape(text_of(v)?));
                }
            }
            out.push('>');
            for (k, v) in m {
                if k.starts_with(&o.attribute_prefix) {
                    continue;
                }
                if *k == o.text_key {
                    out.push_str(&escape(text_of(v)?));
                } else {
                    element(out, k, v, o, depth + 1)?;
                }
            }
            let _ = write!(out, "</{name}>");
        }
        scalar => {
            let _ = write!(out, "<{name}>{}</{name}>", escape(text_of(scalar)?));
        }
    }
    Ok(())
}

fn text_of(v: &Value) -> Result<String, String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => return Err("an attribute or text value must be a string, number or boolean".into()),
    };
    // XML 1.0 has no way to write most control characters, escaped or not.
    if let Some(c) = text.chars().find(|c| {
        (*c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    }) {
        return Err(format!("U+{:04X} cannot be written in XML", u32::from(c)));
    }
    Ok(text)
}

/// A conservative XML name: a letter or `_` first, then letters, digits, `-`, `.`, `_` or a
/// namespace prefix's `:`.
fn is_xml_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts() -> XmlOptions {
        XmlOptions::default()
    }

    #[test]
    fn elements_attributes_text_and_repeats() {
        let xml = br#"<?xml version="1.0"?>
            <order id="7" xmlns:x="urn:x">
              <item sku="a">2</item>
              <item sku="b">3</item>
              <note>fish &amp; chips &#x263A;</note>
              <empty/>
              <flag>true</flag>
              <code>007</code>
              <x:tag>t</x:tag>
            </order>"#;
        let v = to_json(xml, &opts()).unwrap();
        assert_eq!(
            v,
            json!({"order": {
                "@id": 7, "@xmlns:x": "urn:x",
                "item": [{"@sku": "a", "#text": 2}, {"@sku": "b", "#text": 3}],
                "note": "fish & chips \u{263A}",
                "empty": null, "flag": true, "code": "007", "x:tag": "t"
            }})
        );
        let o = XmlOptions {
            strip_namespaces: true,
            arrays: vec!["tag".into()],
            ..opts()
        };
        let v = to_json(xml, &o).unwrap();
        assert_eq!(v["order"]["tag"], json!(["t"]));
        assert!(v["order"].get("@xmlns:x").is_none());
    }

    #[test]
    fn round_trips_both_ways() {
        let doc = json!({"user": {"@id": 1, "name": "Ada <&> \"x\"", "roles": ["a", "b"],
            "age": 36, "ratio": 0.5, "admin": false, "manager": null,
            "address": {"city": "London", "zip": "N1"}}});
        let xml = from_json(&doc, &opts()).unwrap();
        assert_eq!(to_json(xml.as_bytes(), &opts()).unwrap(), doc);

        let xml = "<a><b x=\"1\">t</b><c>1</c><c>2</c><d/></a>";
        let back = from_json(&to_json(xml.as_bytes(), &opts()).unwrap(), &opts()).unwrap();
        assert_eq!(
            back,
            format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>{xml}")
        );
    }

    #[test]
    fn documents_without_one_root_go_under_root() {
        let o = opts();
        assert_eq!(
            from_json(&json!({"a": 1, "b": 2}), &o).unwrap(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><root><a>1</a><b>2</b></root>"
        );
        assert_eq!(
            from_json(&json!([1, 2]), &o).unwrap(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><root><item>1</item><item>2</item></root>"
        );
        let soap = XmlOptions {
            soap: Some("1.1".into()),
            ..opts()
        };
        let out = from_json(&json!({"GetUser": {"id": 3}}), &soap).unwrap();
        assert!(out.contains("<soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body><GetUser><id>3</id></GetUser></soap:Body>"));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        for (xml, why) in [
            (&b"<a><b></a>"[..], "invalid XML"),
            (b"<a/><b/>", "more than one root"),
            (b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>", "DTD"),
            (b"<a>&nope;</a>", "unknown entity"),
            (b"<a>", "ends inside"),
            (b"", "no element"),
            (b"\xff", "UTF-8"),
        ] {
            let e = to_json(xml, &opts()).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let deep = "<a>".repeat(200) + &"</a>".repeat(200);
        assert!(
            to_json(deep.as_bytes(), &opts())
                .unwrap_err()
                .contains("deeper")
        );
        assert!(
            from_json(&json!({"a b": 1}), &opts())
                .unwrap_err()
                .contains("element name")
        );
        assert!(
            from_json(&json!({"a": "x\u{1}"}), &opts())
                .unwrap_err()
                .contains("U+0001")
        );
        // One array member would be several roots: it goes under `root`.
        assert_eq!(
            from_json(&json!({"items": [1, 2]}), &opts()).unwrap(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><root><items>1</items><items>2</items></root>"
        );
        assert_eq!(
            from_json(&json!({"items": []}), &opts()).unwrap(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><root></root>"
        );
    }
}
