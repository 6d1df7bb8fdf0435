//! The HTTP caching rules the cache applies (RFC 9111, with RFC 5861's stale extensions):
//! parsing `Cache-Control`, deciding whether a response may be stored and for how long,
//! computing its age, and matching conditional requests. Pure functions over headers and
//! times, so each rule is tested on its own.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode, header};
use turnpike_model::policy::CacheConfig;

/// The `Cache-Control` directives the cache acts on, from a request or a response.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    /// `no-cache` (with or without a field list: both are taken as "validate every time").
    pub no_cache: bool,
    /// `private` (with or without a field list: both keep the response out of a shared cache).
    pub private: bool,
    pub public: bool,
    /// `must-revalidate`: never served stale, and a response to a request with credentials
    /// may be shared.
    pub must_revalidate: bool,
    /// `proxy-revalidate`: never served stale by a shared cache (it does not allow sharing
    /// an answer to a request with credentials).
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub only_if_cached: bool,
    /// `max-stale` without a value means any staleness: `Some(u64::MAX)`.
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
}

/// Parses every `Cache-Control` field line. Unknown directives are ignored; a malformed
/// delta-seconds makes its directive count as absent, except `max-age`, where RFC 9111
/// (§4.2.1) says an invalid value means stale: it becomes 0.
pub fn directives(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for item in split_list(text) {
            let (name, arg) = match item.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (item, None),
            };
            let secs = || arg.and_then(|a| a.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "max-age" => d.max_age = Some(secs().unwrap_or(0)),
                "s-maxage" => d.s_maxage = Some(secs().unwrap_or(0)),
                "stale-while-revalidate" => d.stale_while_revalidate = secs(),
                "stale-if-error" => d.stale_if_error = secs(),
                "only-if-cached" => d.only_if_cached = true,
                "max-stale" => d.max_stale = Some(secs().unwrap_or(u64::MAX)),
                "min-fresh" => d.min_fresh = secs(),
                _ => {}
            }
        }
    }
    d
}

/// The elements of a comma-separated list, trimmed, without empty ones. Commas inside
/// quoted strings (`no-cache="a, b"`) do not split.
fn split_list(text: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter().map(str::trim).filter(|s| !s.is_empty())
}

/// Why a response was not stored (for debugging and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// The status is not in the policy's list.
    Status,
    /// `no-store` in the request or the response.
    NoStore,
    /// `private`: a shared cache must not keep it.
    Private,
    /// The request carried `Authorization` or `Cookie` and the response did not allow
    /// sharing it.
    Authorization,
    /// `Set-Cookie`: the response belongs to one client.
    SetCookie,
    /// `Vary: *`: no later request can be known to match.
    VaryAll,
    /// No freshness (no `max-age`, `s-maxage`, `Expires`, no `default_ttl`) and nothing to
    /// validate it with.
    NoFreshness,
}

/// How long a stored response may be used, decided when it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storable {
    /// Freshness lifetime.
    pub lifetime: Duration,
    /// How long past it the entry may be served while refreshed in the background.
    pub stale_while_revalidate: Duration,
    /// How long past it the entry may be served when the upstream fails.
    pub stale_if_error: Duration,
    /// `must-revalidate`: never served stale.
    pub must_revalidate: bool,
    /// `no-cache`: validated before every use.
    pub no_cache: bool,
}

/// Whether a response to a request may be stored (RFC 9111 §3), and for how long.
pub fn storable(
    cfg: &CacheConfig,
    req: &HeaderMap,
    status: StatusCode,
    resp: &HeaderMap,
    now: SystemTime,
) -> Result<Storable, NotStored> {
    if !cfg.statuses.contains(&status.as_u16()) {
        return Err(NotStored::Status);
    }
    let rd = directives(req);
    let d = directives(resp);
    if rd.no_store || d.no_store {
        return Err(NotStored::NoStore);
    }
    if d.private {
        return Err(NotStored::Private);
    }
    // A request with credentials may get an answer for that caller alone: shared only when
    // the response says it may be (RFC 9111 §3.5; a cookie is treated the same way).
    if (req.contains_key(header::AUTHORIZATION) || req.contains_key(header::COOKIE))
        && !(d.public || d.s_maxage.is_some() || d.must_revalidate)
    {
        return Err(NotStored::Authorization);
    }
    if resp.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if vary_names(resp).iter().any(|n| n == "*") {
        return Err(NotStored::VaryAll);
    }
    let explicit = if d.no_cache {
        // Stored, but every use is validated first.
        Some(Duration::ZERO)
    } else if let Some(ttl) = cfg.ttl {
        Some(ttl)
    } else if let Some(s) = d.s_maxage.or(d.max_age) {
        Some(Duration::from_secs(s))
    } else {
        expires_lifetime(resp, now)
    };
    let lifetime = match explicit.or(cfg.default_ttl) {
        Some(l) => l,
        None => return Err(NotStored::NoFreshness),
    };
    // `s-maxage` carries `proxy-revalidate` for a shared cache (RFC 9111 §5.2.2.10).
    let must_revalidate = d.must_revalidate || d.proxy_revalidate || d.s_maxage.is_some();
    let stale = |given: Option<u64>, default: Duration| {
        if must_revalidate {
            Duration::ZERO
        } else {
            given.map_or(default, Duration::from_secs)
        }
    };
    let stored = Storable {
        lifetime,
        stale_while_revalidate: if d.no_cache {
            Duration::ZERO
        } else {
            stale(d.stale_while_revalidate, cfg.stale_while_revalidate)
        },
        stale_if_error: stale(d.stale_if_error, cfg.stale_if_error),
        must_revalidate,
        no_cache: d.no_cache,
    };
    if lifetime.is_zero()
        && !has_validator(resp)
        && stored.stale_while_revalidate.is_zero()
        && stored.stale_if_error.is_zero()
    {
        // Never usable as it is, never validatable, never a stand-in: keeping it gains
        // nothing.
        return Err(NotStored::NoFreshness);
    }
    Ok(stored)
}

/// `Expires - Date` (RFC 9111 §4.2.1): an invalid `Expires` (`0`, say) means already stale.
/// Without `Date`, the time the response was received stands in for it.
fn expires_lifetime(resp: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let expires = resp.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = resp.get(header::DATE).and_then(http_date).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

fn has_validator(resp: &HeaderMap) -> bool {
    resp.contains_key(header::ETAG) || resp.contains_key(header::LAST_MODIFIED)
}

/// An HTTP date, in any of the three forms RFC 9110 accepts.
pub fn http_date(v: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(v.to_str().ok()?).ok()
}

/// The header names a response's `Vary` lists, lowercased.
pub fn vary_names(resp: &HeaderMap) -> Vec<String> {
    let mut names = Vec::new();
    for v in resp.get_all(header::VARY) {
        if let Ok(text) = v.to_str() {
            names.extend(split_list(text).map(str::to_ascii_lowercase));
        }
    }
    names
}

/// The age a response had when it was received (RFC 9111 §4.2.3: `corrected_initial_age`),
/// from its `Date` and `Age` and the times the request was sent and the response arrived.
pub fn initial_age(
    resp: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let apparent = resp
        .get(header::DATE)
        .and_then(http_date)
        .and_then(|date| response_time.duration_since(date).ok())
        .unwrap_or(Duration::ZERO);
    let age_value = resp
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent.max(age_value + delay)
}

/// What a request allows of a stored response, given its current age and lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usable {
    /// Fresh enough for this request: answer from the cache.
    Fresh,
    /// Stale within `stale-while-revalidate` (or the request's `max-stale`): answer from
    /// the cache and refresh in the background.
    StaleRevalidate,
    /// Must be validated (or fetched) before use; may still be served if the upstream
    /// fails within `stale-if-error`.
    Validate,
}

/// Decides how a stored response may be used for a request (RFC 9111 §4.2, §5.2.1; RFC 5861).
/// `honor_request` says whether the request's own directives count.
pub fn usable(req: &Directives, honor_request: bool, age: Duration, stored: &Storable) -> Usable {
    let forced = honor_request
        && (req.no_cache || req.max_age.is_some_and(|m| age > Duration::from_secs(m)));
    if forced || stored.no_cache {
        return Usable::Validate;
    }
    let min_fresh = if honor_request {
        req.min_fresh.map_or(Duration::ZERO, Duration::from_secs)
    } else {
        Duration::ZERO
    };
    if age + min_fresh < stored.lifetime {
        return Usable::Fresh;
    }
    if stored.must_revalidate {
        return Usable::Validate;
    }
    let staleness = age.saturating_sub(stored.lifetime);
    if honor_request
        && let Some(max_stale) = req.max_stale
        && staleness <= Duration::from_secs(max_stale.min(u64::MAX / 2))
    {
        return Usable::Fresh;
    }
    if staleness < stored.stale_while_revalidate {
        Usable::StaleRevalidate
    } else {
        Usable::Validate
    }
}

/// Whether a client's conditional request is satisfied by the stored response, so the
/// cache answers 304 (RFC 9110 §13.1.1–2: `If-None-Match` wins over `If-Modified-Since`).
pub fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    if req.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let tag = opaque(etag);
        return req.get_all(header::IF_NONE_MATCH).iter().any(|v| {
            v.to_str()
                .is_ok_and(|t| split_list(t).any(|c| c == "*" || opaque(c) == tag))
        });
    }
    let (Some(since), Some(modified)) = (
        req.get(header::IF_MODIFIED_SINCE).and_then(http_date),
        stored.get(header::LAST_MODIFIED).and_then(http_date),
    ) else {
        return false;
    };
    modified <= since
}

/// An entity tag without its weakness prefix: `If-None-Match` uses the weak comparison.
fn opaque(tag: &str) -> &str {
    tag.trim().strip_prefix("W/").unwrap_or(tag.trim())
}

/// The header fields a 304 carries from the stored response (RFC 9110 §15.4.5).
pub const NOT_MODIFIED_FIELDS: [header::HeaderName; 6] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
];

/// Fields a 304 from the upstream must not replace in the stored response (RFC 9111 §3.2:
/// framing and the body's own description stay those of the stored body).
pub fn keeps_stored(name: &header::HeaderName) -> bool {
    matches!(
        *name,
        header::CONTENT_LENGTH
            | header::CONTENT_ENCODING
            | header::TRANSFER_ENCODING
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(at(secs))
    }

    #[test]
    fn directives_are_parsed_case_insensitively_with_quoted_lists() {
        let d = directives(&headers(&[
            (
                "cache-control",
                "Public, MAX-AGE=60, no-cache=\"set-cookie, x\"",
            ),
            (
                "cache-control",
                "stale-while-revalidate=5,stale-if-error=\"30\"",
            ),
        ]));
        assert!(d.public && d.no_cache && !d.private);
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.stale_while_revalidate, Some(5));
        assert_eq!(d.stale_if_error, Some(30));
        // An invalid max-age means stale, not "no max-age".
        assert_eq!(
            directives(&headers(&[("cache-control", "max-age=soon")])).max_age,
            Some(0)
        );
        assert_eq!(
            directives(&headers(&[("cache-control", "max-stale")])).max_stale,
            Some(u64::MAX)
        );
    }

    /// One row of the storability table: response headers, request headers, status, and
    /// the expected lifetime in seconds or why it is not stored.
    struct Case {
        resp: &'static [(&'static str, &'static str)],
        req: &'static [(&'static str, &'static str)],
        status: u16,
        want: Result<u64, NotStored>,
    }

    #[test]
    fn storability_table() {
        let cfg = CacheConfig::default();
        let cases = [
            Case {
                resp: &[("cache-control", "max-age=60")],
                req: &[],
                status: 200,
                want: Ok(60),
            },
            Case {
                resp: &[("cache-control", "max-age=60, s-maxage=10")],
                req: &[],
                status: 200,
                want: Ok(10),
            },
            Case {
                resp: &[("cache-control", "no-store, max-age=60")],
                req: &[],
                status: 200,
                want: Err(NotStored::NoStore),
            },
            Case {
                resp: &[("cache-control", "max-age=60")],
                req: &[("cache-control", "no-store")],
                status: 200,
                want: Err(NotStored::NoStore),
            },
            Case {
                resp: &[("cache-control", "private, max-age=60")],
                req: &[],
                status: 200,
                want: Err(NotStored::Private),
            },
            Case {
                resp: &[("cache-control", "max-age=60")],
                req: &[("authorization", "Bearer x")],
                status: 200,
                want: Err(NotStored::Authorization),
            },
            Case {
                resp: &[("cache-control", "public, max-age=60")],
                req: &[("authorization", "Bearer x")],
                status: 200,
                want: Ok(60),
            },
            Case {
                resp: &[("cache-control", "s-maxage=5")],
                req: &[("authorization", "Bearer x")],
                status: 200,
                want: Ok(5),
            },
            Case {
                resp: &[("cache-control", "max-age=60, proxy-revalidate")],
                req: &[("authorization", "Bearer x")],
                status: 200,
                want: Err(NotStored::Authorization),
            },
            Case {
                resp: &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                req: &[],
                status: 200,
                want: Err(NotStored::SetCookie),
            },
            Case {
                resp: &[("cache-control", "max-age=60"), ("vary", "accept, *")],
                req: &[],
                status: 200,
                want: Err(NotStored::VaryAll),
            },
            Case {
                resp: &[("cache-control", "max-age=60")],
                req: &[],
                status: 500,
                want: Err(NotStored::Status),
            },
            Case {
                resp: &[("cache-control", "max-age=60")],
                req: &[],
                status: 206,
                want: Err(NotStored::Status),
            },
            // A dynamic page says nothing: not stored, whatever its path looks like.
            Case {
                resp: &[("content-type", "text/css")],
                req: &[],
                status: 200,
                want: Err(NotStored::NoFreshness),
            },
            Case {
                resp: &[("cache-control", "no-cache"), ("etag", "\"v1\"")],
                req: &[],
                status: 200,
                want: Ok(0),
            },
            Case {
                resp: &[("cache-control", "no-cache, stale-if-error=0")],
                req: &[],
                status: 200,
                want: Err(NotStored::NoFreshness),
            },
            Case {
                resp: &[("cache-control", "max-age=60")],
                req: &[("cookie", "s=1")],
                status: 200,
                want: Err(NotStored::Authorization),
            },
            Case {
                resp: &[
                    ("cache-control", "max-age=0"),
                    ("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT"),
                ],
                req: &[],
                status: 200,
                want: Ok(0),
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let got = storable(
                &cfg,
                &headers(c.req),
                StatusCode::from_u16(c.status).unwrap(),
                &headers(c.resp),
                at(0),
            )
            .map(|s| s.lifetime.as_secs());
            assert_eq!(got, c.want, "case {i}");
        }
    }

    #[test]
    fn expires_counts_from_date_and_an_invalid_one_is_stale() {
        let cfg = CacheConfig::default();
        let d = date(0);
        let e = date(120);
        let resp = headers(&[("date", d.as_str()), ("expires", e.as_str())]);
        let s = storable(&cfg, &HeaderMap::new(), StatusCode::OK, &resp, at(5)).unwrap();
        assert_eq!(s.lifetime, Duration::from_secs(120));
        // max-age wins over Expires.
        let resp = headers(&[
            ("date", d.as_str()),
            ("expires", e.as_str()),
            ("cache-control", "max-age=7"),
        ]);
        let s = storable(&cfg, &HeaderMap::new(), StatusCode::OK, &resp, at(5)).unwrap();
        assert_eq!(s.lifetime, Duration::from_secs(7));
        let resp = headers(&[("expires", "0"), ("etag", "\"a\"")]);
        let s = storable(&cfg, &HeaderMap::new(), StatusCode::OK, &resp, at(5)).unwrap();
        assert_eq!(s.lifetime, Duration::ZERO);
    }

    #[test]
    fn ttl_override_and_default_ttl() {
        let cfg = CacheConfig {
            ttl: Some(Duration::from_secs(9)),
            ..CacheConfig::default()
        };
        let resp = headers(&[("cache-control", "max-age=600")]);
        let s = storable(&cfg, &HeaderMap::new(), StatusCode::OK, &resp, at(0)).unwrap();
        assert_eq!(s.lifetime, Duration::from_secs(9));
        // The override does not make a private response shared.
        let resp = headers(&[("cache-control", "private")]);
        assert_eq!(
            storable(&cfg, &HeaderMap::new(), StatusCode::OK, &resp, at(0)),
            Err(NotStored::Private)
        );
        let cfg = CacheConfig {
            default_ttl: Some(Duration::from_secs(3)),
            ..CacheConfig::default()
        };
        let s = storable(
            &cfg,
            &HeaderMap::new(),
            StatusCode::OK,
            &HeaderMap::new(),
            at(0),
        )
        .unwrap();
        assert_eq!(s.lifetime, Duration::from_secs(3));
    }

    #[test]
    fn stale_windows_come_from_the_response_or_the_policy_and_must_revalidate_clears_them() {
        let cfg = CacheConfig::default();
        let resp = headers(&[("cache-control", "max-age=1, stale-while-revalidate=10")]);
        let s = storable(&cfg, &HeaderMap::new(), StatusCode::OK, &resp, at(0)).unwrap();
        assert_eq!(s.stale_while_revalidate, Duration::from_secs(10));
        assert_eq!(s.stale_if_error, cfg.stale_if_error);
        for cc in [
            "max-age=1, must-revalidate, stale-if-error=60",
            "max-age=1, proxy-revalidate, stale-if-error=60",
            "s-maxage=1, stale-if-error=60",
        ] {
            let resp = headers(&[("cache-control", cc)]);
            let s = storable(&cfg, &HeaderMap::new(), StatusCode::OK, &resp, at(0)).unwrap();
            assert_eq!(
                (s.stale_while_revalidate, s.stale_if_error),
                (Duration::ZERO, Duration::ZERO),
                "{cc}"
            );
        }
    }

    #[test]
    fn age_follows_date_age_and_the_round_trip() {
        let d = date(0);
        // Received 3 s after its Date, the request took 1 s: apparent age 3 wins over 0 + 1.
        let resp = headers(&[("date", d.as_str())]);
        assert_eq!(initial_age(&resp, at(2), at(3)), Duration::from_secs(3));
        // An Age header from an upstream cache, plus the delay.
        let resp = headers(&[("date", d.as_str()), ("age", "10")]);
        assert_eq!(initial_age(&resp, at(0), at(1)), Duration::from_secs(11));
        // A Date in the future (clock skew) gives no negative age.
        let future = date(100);
        let resp = headers(&[("date", future.as_str())]);
        assert_eq!(initial_age(&resp, at(0), at(0)), Duration::ZERO);
    }

    #[test]
    fn usability_by_age_and_request_directives() {
        let stored = Storable {
            lifetime: Duration::from_secs(10),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(60),
            must_revalidate: false,
            no_cache: false,
        };
        let none = Directives::default();
        let secs = Duration::from_secs;
        assert_eq!(usable(&none, true, secs(3), &stored), Usable::Fresh);
        assert_eq!(
            usable(&none, true, secs(12), &stored),
            Usable::StaleRevalidate
        );
        assert_eq!(usable(&none, true, secs(16), &stored), Usable::Validate);
        let no_cache = directives(&headers(&[("cache-control", "no-cache")]));
        assert_eq!(usable(&no_cache, true, secs(3), &stored), Usable::Validate);
        // A gateway that does not let clients force upstream calls ignores it.
        assert_eq!(usable(&no_cache, false, secs(3), &stored), Usable::Fresh);
        let max_age = directives(&headers(&[("cache-control", "max-age=2")]));
        assert_eq!(usable(&max_age, true, secs(3), &stored), Usable::Validate);
        let min_fresh = directives(&headers(&[("cache-control", "min-fresh=8")]));
        assert_eq!(
            usable(&min_fresh, true, secs(3), &stored),
            Usable::StaleRevalidate
        );
        let max_stale = directives(&headers(&[("cache-control", "max-stale=100")]));
        assert_eq!(usable(&max_stale, true, secs(50), &stored), Usable::Fresh);
        let strict = Storable {
            must_revalidate: true,
            ..stored
        };
        assert_eq!(
            usable(&max_stale, true, secs(12), &strict),
            Usable::Validate
        );
    }

    #[test]
    fn conditional_requests_match_weakly_and_etag_wins() {
        let stored = headers(&[
            ("etag", "W/\"v1\""),
            ("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT"),
        ]);
        assert!(not_modified(
            &headers(&[("if-none-match", "\"v0\", \"v1\"")]),
            &stored
        ));
        assert!(not_modified(&headers(&[("if-none-match", "*")]), &stored));
        assert!(!not_modified(
            &headers(&[("if-none-match", "\"v2\"")]),
            &stored
        ));
        // If-None-Match present: If-Modified-Since is not looked at.
        assert!(!not_modified(
            &headers(&[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", "Wed, 16 Nov 1994 12:45:26 GMT")
            ]),
            &stored
        ));
        assert!(not_modified(
            &headers(&[("if-modified-since", "Wed, 16 Nov 1994 12:45:26 GMT")]),
            &stored
        ));
        assert!(!not_modified(
            &headers(&[("if-modified-since", "Mon, 14 Nov 1994 12:45:26 GMT")]),
            &stored
        ));
    }
}
