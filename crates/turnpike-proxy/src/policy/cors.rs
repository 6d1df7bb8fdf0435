//! `cors`: answers preflights and adds CORS headers for allowed origins.
//!
//! An origin is allowed when it equals a configured origin (ASCII case-insensitively) or
//! matches a wildcard pattern `scheme://*.domain[:port]`, which needs at least one label
//! before `.domain` and the same scheme and port. The request's `Origin` is echoed only
//! when allowed, so no arbitrary origin is ever reflected: not `null`, not `evil.com`, not
//! `example.com.evil.com`. `*` is sent literally, and only without credentials (the
//! configuration refuses `*` with `allow_credentials`).

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use turnpike_model::policy::CorsConfig;

use crate::body::ProxyBody;
use crate::error::{ErrorKind, GatewayError};

/// One configured origin.
enum Pattern {
    Any,
    Exact(String),
    /// `scheme://` and `.domain[:port]` around one or more labels.
    Wildcard {
        scheme: String,
        suffix: String,
    },
}

/// `cors`, compiled.
pub struct Cors {
    patterns: Vec<Pattern>,
    any: bool,
    credentials: bool,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
}

impl Cors {
    /// Compiles the policy.
    pub fn new(c: CorsConfig) -> Result<Self, (String, String)> {
        let mut patterns = Vec::new();
        for (i, o) in c.allow_origins.iter().enumerate() {
            turnpike_model::policy::check_origin_pattern(o)
                .map_err(|e| (format!("allow_origins[{i}]"), e))?;
            let o = o.to_ascii_lowercase();
            patterns.push(if o == "*" {
                Pattern::Any
            } else if let Some((scheme, rest)) = o.split_once("://*.") {
                Pattern::Wildcard {
                    scheme: format!("{scheme}://"),
                    suffix: format!(".{rest}"),
                }
            } else {
                Pattern::Exact(o)
            });
        }
        let list = |field: &str, v: &[String]| -> Result<Option<HeaderValue>, (String, String)> {
            if v.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(&v.join(", "))
                .map(Some)
                .map_err(|_| (field.to_owned(), "not valid header text".to_owned()))
        };
        Ok(Self {
            any: patterns.iter().any(|p| matches!(p, Pattern::Any)),
            patterns,
            credentials: c.allow_credentials,
            methods: list("allow_methods", &c.allow_methods)?
                .unwrap_or(HeaderValue::from_static("GET, HEAD, POST")),
            headers: list("allow_headers", &c.allow_headers)?,
            expose: list("expose_headers", &c.expose_headers)?,
            max_age: HeaderValue::from(c.max_age.as_secs()),
        })
    }

    fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.patterns.iter().any(|p| match p {
            Pattern::Any => false,
            Pattern::Exact(o) => *o == origin,
            Pattern::Wildcard { scheme, suffix } => origin
                .strip_prefix(scheme.as_str())
                .and_then(|host| host.strip_suffix(suffix.as_str()))
                .is_some_and(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                        && !label.starts_with('.')
                        && !label.ends_with('.')
                }),
        })
    }

    /// Puts the CORS response headers for this request into `out`, and returns the answer
    /// to a preflight (sent after the limits): 204, or 403 `cors_denied` for an origin that
    /// may not call; `None` for other requests.
    pub fn decide(
        &self,
        method: &Method,
        headers: &HeaderMap,
        out: &mut HeaderMap,
    ) -> Option<Result<Response<ProxyBody>, GatewayError>> {
        let origin = headers.get(header::ORIGIN)?;
        let preflight = method == Method::OPTIONS
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        if !self.any || allowed {
            // The answer depends on the origin: caches must keep one per origin.
            out.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        if allowed {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            if self.credentials {
                out.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        } else if self.any {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
        let permitted = allowed || self.any;
        if !preflight {
            if permitted && let Some(e) = &self.expose {
                out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
            }
            return None;
        }
        if !permitted {
            return Some(Err(GatewayError::new(
                ErrorKind::CorsDenied,
                "this origin may not call this API",
            )));
        }
        let mut resp = Response::new(crate::body::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        if let Some(v) = &self.headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        out.append(
            header::VARY,
            HeaderValue::from_static(
                "Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        Some(Ok(resp))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], credentials: bool) -> Cors {
        Cors::new(CorsConfig {
            allow_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_methods: vec!["GET".into(), "PUT".into()],
            allow_headers: vec!["content-type".into()],
            expose_headers: vec!["x-total".into()],
            allow_credentials: credentials,
            max_age: std::time::Duration::from_secs(600),
        })
        .unwrap()
    }

    fn request(origin: &str, preflight: bool) -> (Method, HeaderMap) {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_REQUEST_METHOD,
                HeaderValue::from_static("PUT"),
            );
            (Method::OPTIONS, h)
        } else {
            (Method::GET, h)
        }
    }

    #[test]
    fn hostile_origins_are_never_reflected() {
        let c = cors(&["https://example.com", "https://*.example.org"], true);
        for hostile in [
            "null",
            "https://evil.com",
            "https://example.com.evil.com",
            "https://evilexample.com",
            "http://example.com",
            "https://example.com:8443",
            "https://example.org",
            "https://.example.org",
            "https://a.example.org.evil.com",
            "https://a_b.example.org",
        ] {
            for preflight in [false, true] {
                let (m, h) = request(hostile, preflight);
                let mut out = HeaderMap::new();
                let resp = c.decide(&m, &h, &mut out);
                assert!(
                    out.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none(),
                    "{hostile} reflected"
                );
                if preflight {
                    let e = resp.unwrap().unwrap_err();
                    assert_eq!(e.kind.status(), StatusCode::FORBIDDEN, "{hostile}");
                }
            }
        }
    }

    #[test]
    fn allowed_origins_get_headers_and_preflights_are_cacheable() {
        let c = cors(&["https://example.com", "https://*.example.org"], true);
        for ok in [
            "https://example.com",
            "https://EXAMPLE.com",
            "https://a.b.example.org",
        ] {
            let (m, h) = request(ok, false);
            let mut out = HeaderMap::new();
            assert!(c.decide(&m, &h, &mut out).is_none());
            assert_eq!(out[header::ACCESS_CONTROL_ALLOW_ORIGIN], ok);
            assert_eq!(out[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
            assert_eq!(out[header::ACCESS_CONTROL_EXPOSE_HEADERS], "x-total");
            assert_eq!(out[header::VARY], "Origin");
        }
        let (m, h) = request("https://example.com", true);
        let mut out = HeaderMap::new();
        let resp = c.decide(&m, &h, &mut out).unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(resp.headers()[header::ACCESS_CONTROL_MAX_AGE], "600");
        assert_eq!(
            resp.headers()[header::ACCESS_CONTROL_ALLOW_METHODS],
            "GET, PUT"
        );
    }

    #[test]
    fn star_is_literal_and_without_credentials() {
        let c = cors(&["*"], false);
        let (m, h) = request("null", false);
        let mut out = HeaderMap::new();
        c.decide(&m, &h, &mut out);
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(out.get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());
    }
}
