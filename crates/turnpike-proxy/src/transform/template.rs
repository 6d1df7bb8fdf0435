//! Rendering of templates ([`turnpike_model::transform::Template`]) against one request.

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderMap;
use serde_json::{Map, Value};
use turnpike_model::managed::Consumer;
use turnpike_model::policy::{Piece, Template, Var};

/// What templates can read of a request (and of its answer, for `response_transform`).
#[derive(Clone, Copy)]
pub struct Vars<'a> {
    /// The request id.
    pub request_id: &'a str,
    /// The real client IP.
    pub client_ip: IpAddr,
    /// The client's method.
    pub method: &'a str,
    /// The normalised path the route matched.
    pub path: &'a str,
    /// The route's name.
    pub route: &'a str,
    /// The identified application.
    pub consumer: Option<&'a Consumer>,
    /// Claims of the verified JWT.
    pub claims: Option<&'a Map<String, Value>>,
    /// The route's path parameters.
    pub params: &'a [(String, String)],
    /// The request headers as the client sent them.
    pub headers: &'a HeaderMap,
    /// The request's query string.
    pub query: Option<&'a str>,
    /// The upstream's status and headers.
    pub response: Option<(u16, &'a HeaderMap)>,
    /// The parsed body being transformed.
    pub body: Option<&'a Value>,
}

/// What templates read of the caller, besides the request head.
pub struct Caller<'a> {
    /// The request id.
    pub request_id: &'a str,
    /// The real client IP.
    pub client_ip: IpAddr,
    /// The normalised path the route matched.
    pub path: &'a str,
    /// The route's name.
    pub route: &'a str,
    /// The identified application.
    pub consumer: Option<&'a Consumer>,
    /// Claims of the verified JWT.
    pub claims: Option<&'a Map<String, Value>>,
    /// The route's path parameters.
    pub params: &'a [(String, String)],
}

impl Caller<'_> {
    /// The variables of the request `parts`.
    pub fn vars<'b>(&'b self, parts: &'b http::request::Parts) -> Vars<'b> {
        Vars {
            request_id: self.request_id,
            client_ip: self.client_ip,
            method: parts.method.as_str(),
            path: self.path,
            route: self.route,
            consumer: self.consumer,
            claims: self.claims,
            params: self.params,
            headers: &parts.headers,
            query: parts.uri.query(),
            response: None,
            body: None,
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<Cow<'a, str>> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut all = format!("{first}, {second}");
            for v in values {
                all.push_str(", ");
                all.push_str(v);
            }
            Some(Cow::Owned(all))
        }
    }
}

fn json_text(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

impl<'a> Vars<'a> {
    /// A variable's text, `None` when it has no value.
    pub fn text(&self, var: &Var) -> Option<Cow<'a, str>> {
        Some(match var {
            Var::RequestId => Cow::Borrowed(self.request_id),
            Var::ClientIp => Cow::Owned(self.client_ip.to_string()),
            Var::Method => Cow::Borrowed(self.method),
            Var::Path => Cow::Borrowed(self.path),
            Var::Route => Cow::Borrowed(self.route),
            Var::AppId => Cow::Borrowed(&*self.consumer?.id),
            Var::AppName => Cow::Borrowed(&*self.consumer?.name),
            Var::Claim(c) => json_text(self.claims?.get(c)?),
            Var::Param(p) => Cow::Borrowed(self.params.iter().find(|(n, _)| n == p)?.1.as_str()),
            Var::Header(h) => header(self.headers, h)?,
            Var::Query(q) => form_urlencoded::parse(self.query?.as_bytes())
                .find(|(n, _)| n == q)
                .map(|(_, v)| Cow::Owned(v.into_owned()))?,
            Var::Status => Cow::Owned(self.response?.0.to_string()),
            Var::ResponseHeader(h) => header(self.response?.1, h)?,
            Var::Body(p) => json_text(self.body?.pointer(p)?),
        })
    }

    /// A variable as a JSON value: claims and body parts keep their type, the rest are
    /// strings; `null` when it has no value.
    pub fn json(&self, var: &Var) -> Value {
        match var {
            Var::Claim(c) => self.claims.and_then(|m| m.get(c)).cloned(),
            Var::Body(p) => self.body.and_then(|b| b.pointer(p)).cloned(),
            Var::Status => self.response.map(|(s, _)| Value::from(s)),
            other => self.text(other).map(|s| Value::String(s.into_owned())),
        }
        .unwrap_or(Value::Null)
    }

    /// Renders `t`, passing each variable's text through `encode` (percent-encoding in a
    /// path, nothing elsewhere).
    pub fn render(&self, t: &Template, encode: fn(&str, &mut String)) -> String {
        let mut out = String::new();
        for p in &t.0 {
            match p {
                Piece::Text(s) => out.push_str(s),
                Piece::Var(v) => {
                    if let Some(s) = self.text(v) {
                        encode(&s, &mut out);
                    }
                }
            }
        }
        out
    }

    /// Renders a path-and-query template: variables before the first literal `?` are
    /// encoded for the path ([`path_segment`]), after it as query components (`&`, `=`, `+`,
    /// `#` escaped), so a value cannot add parameters.
    pub fn render_url(&self, t: &Template) -> String {
        let mut out = String::new();
        let mut in_query = false;
        for p in &t.0 {
            match p {
                Piece::Text(s) => {
                    in_query |= s.contains('?');
                    out.push_str(s);
                }
                Piece::Var(v) => {
                    if let Some(s) = self.text(v) {
                        if in_query {
                            out.extend(form_urlencoded::byte_serialize(s.as_bytes()));
                        } else {
                            path_segment(&s, &mut out);
                        }
                    }
                }
            }
        }
        out
    }

    /// Renders a compiled JSON template.
    pub fn render_json(&self, t: &JsonTemplate) -> Value {
        match t {
            JsonTemplate::Literal(v) => v.clone(),
            JsonTemplate::Var(var) => self.json(var),
            JsonTemplate::Text(t) => Value::String(self.render(t, plain)),
            JsonTemplate::Array(a) => Value::Array(a.iter().map(|t| self.render_json(t)).collect()),
            JsonTemplate::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, t)| (k.clone(), self.render_json(t)))
                    .collect(),
            ),
        }
    }
}

/// A JSON value whose strings are templates, parsed once: a string that is one variable
/// alone takes the variable's JSON value.
#[derive(Debug)]
pub enum JsonTemplate {
    /// No variable anywhere below.
    Literal(Value),
    /// One variable alone.
    Var(Var),
    /// Text with variables.
    Text(Template),
    /// An array with templates inside.
    Array(Vec<JsonTemplate>),
    /// An object with templates inside.
    Object(Vec<(String, JsonTemplate)>),
}

impl JsonTemplate {
    /// Compiles `v`, naming the first bad template.
    pub fn compile(v: &Value, scope: turnpike_model::policy::Scope) -> Result<Self, String> {
        let t = match v {
            Value::String(s) => {
                let t = Template::parse(s, scope)?;
                if t.is_literal() {
                    // `$${` has become `${`.
                    let text: String =
                        t.0.iter()
                            .map(|p| match p {
                                Piece::Text(s) => s.as_str(),
                                Piece::Var(_) => "",
                            })
                            .collect();
                    return Ok(Self::Literal(Value::String(text)));
                }
                match t.single() {
                    Some(var) => Self::Var(var.clone()),
                    None => Self::Text(t),
                }
            }
            Value::Array(a) => Self::Array(
                a.iter()
                    .map(|v| Self::compile(v, scope))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(o) => Self::Object(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), Self::compile(v, scope)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => return Ok(Self::Literal(other.clone())),
        };
        // A container with no variable below is one literal, cloned whole per request.
        Ok(match t {
            Self::Array(items) if items.iter().all(|i| matches!(i, Self::Literal(_))) => {
                Self::Literal(Value::Array(
                    items.into_iter().map(Self::into_literal).collect(),
                ))
            }
            Self::Object(items) if items.iter().all(|(_, i)| matches!(i, Self::Literal(_))) => {
                Self::Literal(Value::Object(
                    items
                        .into_iter()
                        .map(|(k, i)| (k, Self::into_literal(i)))
                        .collect(),
                ))
            }
            t => t,
        })
    }

    fn into_literal(self) -> Value {
        match self {
            Self::Literal(v) => v,
            _ => Value::Null,
        }
    }
}

/// Appends `s` as it is.
pub fn plain(s: &str, out: &mut String) {
    out.push_str(s);
}

/// Appends `s` percent-encoded for a path: unreserved characters, sub-delimiters, `:`, `@`,
/// `/` and `%XX` escapes already there stay (a route parameter keeps its escapes rather than
/// being encoded twice). Dot segments a value could make are refused by the caller.
pub fn path_segment(s: &str, out: &mut String) {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let escape = b == b'%'
            && bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b) || escape {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
        i += 1;
    }
}

/// Whether a path has a `.` or `..` segment, plain or percent-encoded.
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| {
        let seg = seg.to_ascii_lowercase().replace("%2e", ".");
        seg == "." || seg == ".."
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use turnpike_model::policy::Scope;

    #[test]
    fn renders_each_variable() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", "1".parse().unwrap());
        headers.append("x-a", "2".parse().unwrap());
        let claims = json!({"sub": "u1", "roles": ["a", "b"]});
        let consumer = Consumer {
            id: "app-1".into(),
            name: "Shop".into(),
            team: "".into(),
            groups: vec![],
        };
        let params = vec![("id".to_owned(), "4 2".to_owned())];
        let resp = HeaderMap::new();
        let body = json!({"data": [{"id": 9}]});
        let v = Vars {
            request_id: "r1",
            client_ip: "192.0.2.1".parse().unwrap(),
            method: "GET",
            path: "/p",
            route: "api",
            consumer: Some(&consumer),
            claims: claims.as_object(),
            params: &params,
            headers: &headers,
            query: Some("q=a%20b&q=c"),
            response: Some((404, &resp)),
            body: Some(&body),
        };
        let all = Scope {
            response: true,
            body: true,
        };
        let t = |s: &str| Template::parse(s, all).unwrap();
        assert_eq!(
            v.render(&t("${request_id}|${client_ip}|${method}|${path}|${route}|${app.id}|${app.name}|${jwt.sub}|${jwt.roles}|${header.x-a}|${query.q}|${status}|${body/data/0/id}|${header.none}"), plain),
            r#"r1|192.0.2.1|GET|/p|api|app-1|Shop|u1|["a","b"]|1, 2|a b|404|9|"#
        );
        assert_eq!(v.render(&t("/u/${param.id}"), path_segment), "/u/4%202");
        let mut out = String::new();
        path_segment("a b/%C3%A9%zz?#", &mut out);
        assert_eq!(out, "a%20b/%C3%A9%25zz%3F%23");
        for p in ["/a/../b", "/a/./b", "/a/%2E%2e/b", "/a/.%2e", "/.."] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in ["/a/.b/c", "/a/...", "/a/b."] {
            assert!(!has_dot_segment(p), "{p}");
        }
        let shape = json!({"roles": "${jwt.roles}", "id": "${body/data/0/id}", "s": "${status}", "n": "${jwt.none}", "t": "x-${app.id}", "k": 1, "l": ["$${x}"]});
        assert_eq!(
            v.render_json(&JsonTemplate::compile(&shape, all).unwrap()),
            json!({"roles": ["a", "b"], "id": 9, "s": 404, "n": null, "t": "x-app-1", "k": 1, "l": ["${x}"]})
        );
    }
}
