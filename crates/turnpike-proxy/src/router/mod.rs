//! Route matching: hosts, normalised paths, methods and predicates, with explicit precedence.
//!
//! PLACEHOLDER API: the real matcher, normaliser and rewrites replace the bodies; the types and
//! signatures below are the contract the proxy relies on.

use http::{HeaderMap, Method};
use turnpike_model::{ConfigError, RouteConfig};

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

/// The compiled route table.
pub struct Router {
    routes: Vec<RouteConfig>,
}

impl Router {
    /// Compiles routes; errors carry paths like `routes[2].paths[0]`.
    pub fn compile(routes: &[RouteConfig]) -> Result<Self, Vec<ConfigError>> {
        Ok(Self {
            routes: routes.to_vec(),
        })
    }

    /// Finds the route for a request.
    pub fn route(&self, req: &RequestView<'_>) -> RouteResult {
        match self.routes.first() {
            Some(_) => RouteResult::Matched(RouteMatch {
                index: 0,
                params: Vec::new(),
                forward_path: req.path.to_owned(),
            }),
            None => RouteResult::NotFound,
        }
    }
}

/// Normalises a raw request path: decodes percent-encoded unreserved characters, removes
/// dot segments and duplicate slashes. Refuses encoded `/` and `\`, NUL and bad escapes.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    Ok(raw.to_owned())
}
