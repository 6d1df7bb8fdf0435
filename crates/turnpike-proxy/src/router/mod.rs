//! Route matching: hosts, normalised paths, methods and predicates, with explicit precedence.
//!
//! # How a request finds its route
//!
//! Before routing, the request path is normalised once (see [`normalize_path`]): unreserved
//! escapes decoded, duplicate slashes merged, `.` and `..` removed. Paths that cannot be
//! normalised safely (encoded `/` or `\`, NUL, control characters, bad escapes) are refused
//! before any route is looked at. Every matcher below sees only the normalised path.
//!
//! A route matches when all of its conditions hold:
//!
//! - **hosts**: one of them matches, or the list is empty (any host, including none). Hosts
//!   compare case-insensitively, without port and without a trailing dot. `api.example.com`
//!   is exact; `*.example.com` matches any name that ends in `.example.com` with at least one
//!   more label (`a.example.com`, `a.b.example.com`), never `example.com` itself.
//! - **paths**: one of them matches, or the list is empty (any path).
//!   - `exact`: the whole path.
//!   - `prefix`: the path equals the prefix or continues it after a `/` (`/api` matches `/api`,
//!     `/api/` and `/api/x`, not `/apix`); a prefix ending in `/` (`/api/`) matches paths that
//!     start with it (`/api/`, `/api/x`).
//!   - `template`: `/users/{id}/posts/{post}`; each `{name}` fills a whole segment and matches
//!     one non-empty segment; a final `{name*}` matches the rest of the path, which may be
//!     empty or span several segments (`/files/{rest*}` matches `/files`, `/files/` and
//!     `/files/a/b`). Each name may appear once.
//!   - `regex`: must match the whole path (it is anchored for you); named groups become
//!     parameters.
//!
//!   Config paths are normalised like requests, so `/a//b` in a file means `/a/b`. Captured
//!   parameters keep the normalised spelling (escapes such as `%20` are not decoded).
//! - **methods**: one of them equals the request method, or the list is empty. Names are
//!   upper-cased when the configuration is loaded. `HEAD` is not implied by `GET`: list it.
//! - **headers**, **query**, **cookies**: every predicate holds. Header names are
//!   case-insensitive; query and cookie names are case-sensitive. When a name occurs several times
//!   (repeated headers, repeated query parameters, several cookies), a value test holds if
//!   any one value passes. Query names and values are form-decoded (`%XX`, `+` is a space).
//!   Tests: `equals`, `prefix`, `regex` (unanchored: it may match anywhere in the value),
//!   `present` (the name occurs, even with an empty value), `absent` (it does not occur).
//!
//! # Precedence
//!
//! When several routes match, the winner is chosen by these rules, in order; a later rule is
//! only consulted when all the earlier ones tie:
//!
//! 1. **Priority**: the higher `priority` wins (default `0`, may be negative).
//! 2. **Host specificity**: an exact host beats a wildcard; a wildcard with more labels beats
//!    one with fewer (`*.eu.example.com` beats `*.example.com`); any wildcard beats a route
//!    without hosts.
//! 3. **Path specificity**: `exact` beats `template`, which beats `regex`, which beats
//!    `prefix`, which beats a route without paths. Between templates, more literal segments
//!    win, then fewer parameters. Between prefixes, the longer wins.
//! 4. **Constraints**: the route with more constraints wins, counting one for a non-empty
//!    `methods` list and one for each header, query and cookie predicate.
//! 5. **File order**: the route that comes first in the configuration wins.
//!
//! A route with several hosts or paths is ranked by the host and the path that actually
//! matched the request, so listing a broad pattern next to a precise one never makes the
//! precise one weaker.
//!
//! # 405 Method Not Allowed
//!
//! If no route matches but some routes match everything except the method, the answer is
//! [`RouteResult::MethodNotAllowed`] with the union of their methods, so the client learns
//! which methods would work. Otherwise it is [`RouteResult::NotFound`].
//!
//! # Rewrites
//!
//! The path sent upstream is computed from the normalised path that matched, by the route's
//! `rewrite`: none (sent as is), `strip_prefix` (the matched prefix is removed; the result
//! always starts with `/`), `template` (`/v2/users/{id}`: parameters of the matched path are
//! substituted; every parameter it names must be captured by every path of the route),
//! `regex` (first match replaced, `${1}`/`${name}` refer to groups), `add_prefix` (prepended).
//! Results of `template` and `regex` rewrites are cleaned of duplicate slashes and dot
//! segments. Because the forwarded path is always derived from the same normalised path the
//! route was chosen on, a request can never be matched by one route yet reach a different
//! upstream path than that route allows: there is no second, differently decoded copy of the
//! path for an attacker to play against the first.

mod matchers;
mod normalize;
mod rewrite;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderMap, Method};
use turnpike_model::versioning::{VersionStrategy, VersionedApiConfig, canonical_version};
use turnpike_model::{ConfigError, RouteConfig};

use matchers::{HeaderPredicate, NamedPredicate, PathMatcher, PathRank, Test, canonical_host};
pub use normalize::normalize_path;
use rewrite::Rewrite;

/// What the router looks at.
pub struct RequestView<'r> {
    /// Host from `Host` or the URI authority, lowercased, without port. `None` if absent.
    pub host: Option<&'r str>,
    /// Normalised path (see [`normalize_path`]).
    pub path: &'r str,
    /// Raw query string, without `?`.
    pub query: Option<&'r str>,
    /// Method.
    pub method: &'r Method,
    /// Headers (cookies are read from `Cookie`).
    pub headers: &'r HeaderMap,
}

/// A successful match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the route in the configuration's `routes`.
    pub index: usize,
    /// Named parameters captured by a template or regex, in order.
    pub params: Vec<(String, String)>,
    /// Path to send upstream, derived from the normalised path by the route's rewrite.
    pub forward_path: String,
}

/// The router's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteResult {
    /// A route matched.
    Matched(RouteMatch),
    /// Routes match everything but the method; these methods would match.
    MethodNotAllowed(Vec<Method>),
    /// Nothing matches.
    NotFound,
}

/// Why a path was refused before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError(pub &'static str);

/// The compiled route table: immutable, shared by all requests of a snapshot.
pub struct Router {
    routes: Vec<CompiledRoute>,
    /// Whether a versioned API takes its version from the path (`/v2/...`).
    path_versions: bool,
    /// Exact host → candidates, so a large table is not scanned for every host.
    exact_hosts: HashMap<Box<str>, Vec<Candidate>>,
    /// Wildcard suffix (`example.com` for `*.example.com`) → candidates.
    wildcard_hosts: HashMap<Box<str>, Vec<Candidate>>,
    /// Routes without hosts.
    any_host: Vec<Candidate>,
}

struct CompiledRoute {
    paths: Vec<PathMatcher>,
    methods: Vec<Method>,
    conditions: Conditions,
    rewrite: Rewrite,
    /// The versioned API and the version (canonical) this route serves.
    version: Option<(Arc<Api>, String)>,
}

/// How a versioned API's requests name their version.
struct Api {
    strategies: Vec<VersionStrategy>,
    header: HeaderName,
    query: String,
    /// `application/vnd.<vendor>.v`, lower case.
    media_prefix: String,
    default: Option<String>,
}

impl Api {
    fn compile(c: &VersionedApiConfig) -> Option<Self> {
        Some(Self {
            strategies: c.strategies.clone(),
            header: HeaderName::from_bytes(c.header.as_bytes()).ok()?,
            query: c.query.clone(),
            media_prefix: format!(
                "application/vnd.{}.v",
                c.vendor.as_deref().unwrap_or(&c.name).to_ascii_lowercase()
            ),
            default: c
                .default
                .as_deref()
                .map(|d| canonical_version(d).to_owned()),
        })
    }

    fn uses_path(&self) -> bool {
        self.strategies.contains(&VersionStrategy::Path)
    }

    /// The version a request names (canonical), by the first strategy that finds one.
    fn requested<'a>(
        &self,
        req: &RequestView<'a>,
        path_version: Option<&'a str>,
    ) -> Option<Cow<'a, str>> {
        for s in &self.strategies {
            let found: Option<Cow<'a, str>> = match s {
                VersionStrategy::Path => path_version.map(Cow::Borrowed),
                VersionStrategy::Header => req
                    .headers
                    .get(&self.header)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| Cow::Borrowed(canonical_version(v)))
                    .filter(|v| !v.is_empty()),
                VersionStrategy::Accept => req
                    .headers
                    .get_all(http::header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .find_map(|range| {
                        let mut params = range.split(';');
                        let media = params.next()?.trim().to_ascii_lowercase();
                        // `q=0` says "not this one".
                        let refused = params.any(|p| {
                            p.trim()
                                .strip_prefix("q=")
                                .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
                        });
                        if refused {
                            return None;
                        }
                        let rest = media.strip_prefix(&self.media_prefix)?;
                        let version = rest.split('+').next()?;
                        (!version.is_empty()).then(|| Cow::Owned(version.to_owned()))
                    }),
                VersionStrategy::Query => req.query.and_then(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .find(|(n, _)| *n == self.query)
                        .map(|(_, v)| Cow::<str>::Owned(canonical_version(&v).to_owned()))
                        .filter(|v| !v.is_empty())
                }),
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// `/v2/users` → (`2`, `/users`); `/v2` → (`2`, `/`). Only `v` followed by a digit.
fn path_version(path: &str) -> Option<(&str, &str)> {
    let rest = path
        .strip_prefix("/v")
        .or_else(|| path.strip_prefix("/V"))?;
    let end = rest.find('/').unwrap_or(rest.len());
    let (version, tail) = rest.split_at(end);
    if !version.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    Some((version, if tail.is_empty() { "/" } else { tail }))
}

/// Header, query and cookie predicates that must all hold: a route's, or a policy's (the
/// A/B rules of `traffic_split`).
#[derive(Default)]
pub struct Conditions {
    headers: Vec<HeaderPredicate>,
    query: Vec<NamedPredicate>,
    cookies: Vec<NamedPredicate>,
}

impl Conditions {
    /// Compiles the predicates; errors are pushed with paths under `p`
    /// (`{p}.headers[0].regex`).
    pub fn compile(
        headers: &[turnpike_model::Predicate],
        query: &[turnpike_model::Predicate],
        cookies: &[turnpike_model::Predicate],
        p: &str,
        errors: &mut Vec<ConfigError>,
    ) -> Self {
        let mut compiled = Vec::with_capacity(headers.len());
        for (j, pred) in headers.iter().enumerate() {
            let at = format!("{p}.headers[{j}]");
            let name = match HeaderName::from_bytes(pred.name.as_bytes()) {
                Ok(name) => Some(name),
                Err(_) => {
                    errors.push(ConfigError::at(
                        format!("{at}.name"),
                        format!("`{}` is not a valid header name", pred.name),
                    ));
                    None
                }
            };
            let test = compile_test(&pred.test, &at, errors);
            if let (Some(name), Some(test)) = (name, test) {
                compiled.push(HeaderPredicate { name, test });
            }
        }

        let mut named = |kind: &str, preds: &[turnpike_model::Predicate]| {
            let mut out = Vec::with_capacity(preds.len());
            for (j, pred) in preds.iter().enumerate() {
                let at = format!("{p}.{kind}[{j}]");
                if pred.name.is_empty() {
                    errors.push(ConfigError::at(format!("{at}.name"), "must not be empty"));
                    continue;
                }
                if let Some(test) = compile_test(&pred.test, &at, errors) {
                    out.push(NamedPredicate {
                        name: pred.name.clone(),
                        test,
                    });
                }
            }
            out
        };
        let query = named("query", query);
        let cookies = named("cookies", cookies);
        Self {
            headers: compiled,
            query,
            cookies,
        }
    }

    /// Whether every predicate holds for a request with these headers and query string.
    pub fn hold(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        self.headers.iter().all(|h| h.holds(headers))
            && self.query.iter().all(|q| q.holds_query(query))
            && self.cookies.iter().all(|c| c.holds_cookie(headers))
    }
}

/// One (route, host, path) combination. Candidate lists are sorted by key, best first, and
/// the key is unique, so the first full match in a list is that list's winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    priority: Reverse<i32>,
    host: Reverse<u16>,
    path_rank: Reverse<PathRank>,
    constraints: Reverse<u32>,
    route: usize,
    /// Index in the route's `paths`; `None` when the route has no paths.
    path: Option<usize>,
}

/// Host specificity: larger is more specific.
const HOST_EXACT: u16 = u16::MAX;
const HOST_ANY: u16 = 0;

impl Router {
    /// Compiles routes; errors carry paths like `routes[2].paths[0]`.
    pub fn compile(routes: &[RouteConfig]) -> Result<Self, Vec<ConfigError>> {
        Self::compile_versioned(routes, &[])
    }

    /// Compiles routes, some of which serve versions of the `versioning` APIs.
    pub fn compile_versioned(
        routes: &[RouteConfig],
        versioning: &[VersionedApiConfig],
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let apis: HashMap<&str, Arc<Api>> = versioning
            .iter()
            .filter_map(|a| Some((a.name.as_str(), Arc::new(Api::compile(a)?))))
            .collect();
        let mut router = Self {
            path_versions: apis.values().any(|a| a.uses_path()),
            routes: Vec::with_capacity(routes.len()),
            exact_hosts: HashMap::new(),
            wildcard_hosts: HashMap::new(),
            any_host: Vec::new(),
        };
        for (i, config) in routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            let mut route = compile_route(config, &p, &mut errors);
            if let Some(v) = &config.api_version {
                match apis.get(v.api.as_str()) {
                    Some(api) => {
                        route.version =
                            Some((Arc::clone(api), canonical_version(&v.name).to_owned()));
                    }
                    None => errors.push(ConfigError::at(
                        format!("{p}.api_version.api"),
                        format!("unknown versioned API `{}`", v.api),
                    )),
                }
            }
            let hosts = compile_hosts(&config.hosts, &p, &mut errors);
            // A version is a constraint: a versioned route beats an unversioned one.
            let constraints = u32::from(!route.methods.is_empty())
                .saturating_add(u32::from(route.version.is_some()))
                .saturating_add(saturate(route.conditions.headers.len()))
                .saturating_add(saturate(route.conditions.query.len()))
                .saturating_add(saturate(route.conditions.cookies.len()));
            let path_choices: Vec<(Option<usize>, PathRank)> = if route.paths.is_empty() {
                vec![(None, PathRank::NONE)]
            } else {
                route
                    .paths
                    .iter()
                    .enumerate()
                    .map(|(j, m)| (Some(j), m.rank()))
                    .collect()
            };
            let add = |list: &mut Vec<Candidate>, host: u16| {
                for &(path, rank) in &path_choices {
                    list.push(Candidate {
                        priority: Reverse(config.priority),
                        host: Reverse(host),
                        path_rank: Reverse(rank),
                        constraints: Reverse(constraints),
                        route: i,
                        path,
                    });
                }
            };
            if hosts.is_empty() {
                add(&mut router.any_host, HOST_ANY);
            }
            for host in hosts {
                match host {
                    HostPattern::Exact(name) => {
                        add(router.exact_hosts.entry(name).or_default(), HOST_EXACT);
                    }
                    HostPattern::Wildcard { suffix, labels } => {
                        add(router.wildcard_hosts.entry(suffix).or_default(), labels);
                    }
                }
            }
            router.routes.push(route);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        router.any_host.sort_unstable();
        for list in router.exact_hosts.values_mut() {
            list.sort_unstable();
        }
        for list in router.wildcard_hosts.values_mut() {
            list.sort_unstable();
        }
        Ok(router)
    }

    /// Finds the route for a request. Allocates only for the answer (parameters, forwarded
    /// path), for the 405 list of methods, and to lower-case a host given in upper case.
    ///
    /// With a versioned API that reads versions from the path, `/v2/rest` is first routed as
    /// `/rest` for version `2` among those APIs' routes; when nothing matches there, the path
    /// is routed as it is.
    pub fn route(&self, req: &RequestView<'_>) -> RouteResult {
        if self.path_versions
            && let Some((version, rest)) = path_version(req.path)
        {
            let stripped = RequestView { path: rest, ..*req };
            let r = self.route_pass(&stripped, Some(version), false);
            if r != RouteResult::NotFound {
                return r;
            }
            // The path named a version no route serves: the API's routes must not take it
            // as a request naming none (their default).
            return self.route_pass(req, None, true);
        }
        self.route_pass(req, None, false)
    }

    fn route_pass(
        &self,
        req: &RequestView<'_>,
        path_version: Option<&str>,
        named_in_path: bool,
    ) -> RouteResult {
        let host = req.host.map(canonical_host);
        let host = host.as_deref();

        let mut best: Option<Candidate> = None;
        self.for_each_list(host, |list| {
            for candidate in list {
                if best.is_some_and(|b| b <= *candidate) {
                    // Sorted list: nothing further down can beat what we have.
                    break;
                }
                if self.matches(candidate, req, true, path_version, named_in_path) {
                    best = Some(*candidate);
                    break;
                }
            }
        });

        if let Some(best) = best {
            if let Some(route) = self.routes.get(best.route) {
                let matched = best.path.and_then(|j| route.paths.get(j));
                let mut params = Vec::new();
                if let Some(m) = matched {
                    m.capture(req.path, &mut params);
                }
                let forward_path = route.rewrite.apply(req.path, matched, &params);
                return RouteResult::Matched(RouteMatch {
                    index: best.route,
                    params,
                    forward_path,
                });
            }
        }

        let mut allowed: Vec<Method> = Vec::new();
        self.for_each_list(host, |list| {
            for candidate in list {
                if let Some(route) = self.routes.get(candidate.route) {
                    // A route without methods would have matched in the first pass.
                    if !route.methods.is_empty()
                        && !route.methods.contains(req.method)
                        && self.matches(candidate, req, false, path_version, named_in_path)
                    {
                        allowed.extend(route.methods.iter().cloned());
                    }
                }
            }
        });
        if allowed.is_empty() {
            return RouteResult::NotFound;
        }
        allowed.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        allowed.dedup();
        RouteResult::MethodNotAllowed(allowed)
    }

    /// Calls `f` with every candidate list that applies to `host`, most specific host first.
    fn for_each_list<'a>(&'a self, host: Option<&str>, mut f: impl FnMut(&'a [Candidate])) {
        if let Some(host) = host {
            if let Some(list) = self.exact_hosts.get(host) {
                f(list);
            }
            // Empty labels (`.example.com`, `a..example.com`) must not satisfy the "at least
            // one more label" rule of wildcards.
            if !self.wildcard_hosts.is_empty() && !host.starts_with('.') && !host.contains("..") {
                // `a.b.example.com` tries `b.example.com`, `example.com`, `com`.
                for (i, _) in host.match_indices('.') {
                    if let Some(list) = host.get(i + 1..).and_then(|s| self.wildcard_hosts.get(s)) {
                        f(list);
                    }
                }
            }
        }
        f(&self.any_host);
    }

    /// Whether the candidate's route and path match; the host was matched by list lookup.
    fn matches(
        &self,
        candidate: &Candidate,
        req: &RequestView<'_>,
        check_method: bool,
        path_version: Option<&str>,
        named_in_path: bool,
    ) -> bool {
        let Some(route) = self.routes.get(candidate.route) else {
            return false;
        };
        match &route.version {
            // A path stripped of its version only reaches routes of APIs that read it there.
            None if path_version.is_some() => return false,
            None => {}
            Some((api, _)) if path_version.is_some() && !api.uses_path() => return false,
            Some((api, _)) if named_in_path && api.uses_path() => return false,
            Some((api, name)) => {
                let wanted = match api.requested(req, path_version) {
                    Some(v) => v.eq_ignore_ascii_case(name),
                    None => api
                        .default
                        .as_deref()
                        .is_some_and(|d| d.eq_ignore_ascii_case(name)),
                };
                if !wanted {
                    return false;
                }
            }
        }
        if check_method && !route.methods.is_empty() && !route.methods.contains(req.method) {
            return false;
        }
        let path_ok = match candidate.path {
            None => true,
            Some(j) => route.paths.get(j).is_some_and(|m| m.is_match(req.path)),
        };
        path_ok && route.conditions.hold(req.headers, req.query)
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

enum HostPattern {
    Exact(Box<str>),
    Wildcard { suffix: Box<str>, labels: u16 },
}

fn compile_hosts(hosts: &[String], p: &str, errors: &mut Vec<ConfigError>) -> Vec<HostPattern> {
    let mut out: Vec<HostPattern> = Vec::with_capacity(hosts.len());
    for (j, raw) in hosts.iter().enumerate() {
        let host = canonical_host(raw);
        let (wildcard, name) = match host.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, host.as_ref()),
        };
        if name.is_empty() || name.contains('*') || name.starts_with('.') || name.contains("..") {
            errors.push(ConfigError::at(
                format!("{p}.hosts[{j}]"),
                format!("`{raw}` is not a host name or `*.domain` pattern"),
            ));
            continue;
        }
        let pattern = if wildcard {
            let labels = name.split('.').count().saturating_add(1);
            HostPattern::Wildcard {
                suffix: name.into(),
                // HOST_EXACT is reserved for exact names.
                labels: u16::try_from(labels)
                    .unwrap_or(HOST_EXACT - 1)
                    .min(HOST_EXACT - 1),
            }
        } else {
            HostPattern::Exact(name.into())
        };
        // Listing a host twice (perhaps in two spellings) would only duplicate candidates.
        let duplicate = out.iter().any(|h| match (h, &pattern) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Wildcard { suffix: a, .. }, HostPattern::Wildcard { suffix: b, .. }) => {
                a == b
            }
            _ => false,
        });
        if !duplicate {
            out.push(pattern);
        }
    }
    out
}

fn compile_route(config: &RouteConfig, p: &str, errors: &mut Vec<ConfigError>) -> CompiledRoute {
    let paths: Vec<Option<PathMatcher>> = config
        .paths
        .iter()
        .enumerate()
        .map(|(j, m)| match PathMatcher::compile(m) {
            Ok(m) => Some(m),
            Err(message) => {
                errors.push(ConfigError::at(format!("{p}.paths[{j}]"), message));
                None
            }
        })
        .collect();

    let mut methods = Vec::with_capacity(config.methods.len());
    for (j, m) in config.methods.iter().enumerate() {
        match matchers::parse_method(m) {
            Some(m) => {
                if !methods.contains(&m) {
                    methods.push(m);
                }
            }
            None => errors.push(ConfigError::at(
                format!("{p}.methods[{j}]"),
                format!("`{m}` is not an HTTP method"),
            )),
        }
    }

    let conditions =
        Conditions::compile(&config.headers, &config.query, &config.cookies, p, errors);

    let rewrite = Rewrite::compile(config.rewrite.as_ref(), &paths, p, errors);

    CompiledRoute {
        paths: paths.into_iter().flatten().collect(),
        methods,
        conditions,
        rewrite,
        version: None,
    }
}

fn compile_test(
    test: &turnpike_model::PredicateTest,
    at: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Test> {
    match Test::compile(test) {
        Ok(t) => Some(t),
        Err((field, message)) => {
            errors.push(ConfigError::at(format!("{at}{field}"), message));
            None
        }
    }
}
