//! API versions: a versioned API (top-level `versioning`) says how a request names the version
//! it wants — path (`/v2/...`), header (`X-API-Version: 2`), media type
//! (`Accept: application/vnd.acme.v2+json`) or query (`?api-version=2`) — and which versions
//! exist, are deprecated or retired. Each route of the API serves one version
//! (`api_version: {api, name}`), with its own upstream and policies.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a request names its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VersionStrategy {
    /// A first path segment `v<version>` (`/v2/users`), removed before routing.
    Path,
    /// A header (`header`, default `X-API-Version`).
    Header,
    /// A vendor media type in `Accept`: `application/vnd.<vendor>.v<version>+json`.
    Accept,
    /// A query parameter (`query`, default `api-version`).
    Query,
}

/// One version of a versioned API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiVersionConfig {
    /// The version (`1`, `2`, `2024-01`); compared without a leading `v`.
    pub name: String,
    /// Deprecated since this moment (RFC 3339): answers carry `Deprecation` (RFC 9745).
    #[serde(default)]
    pub deprecated: Option<String>,
    /// When it goes away (RFC 3339): answers carry `Sunset` (RFC 8594).
    #[serde(default)]
    pub sunset: Option<String>,
    /// A page about the deprecation: `Link: <...>; rel="deprecation"`.
    #[serde(default)]
    pub link: Option<String>,
    /// Retired: requests get 410 `api_retired`, naming the successor.
    #[serde(default)]
    pub retired: bool,
    /// The version that replaces this one (`Link: ...; rel="successor-version"`).
    #[serde(default)]
    pub successor: Option<String>,
}

/// A versioned API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionedApiConfig {
    /// The API's name, referred to by its routes.
    pub name: String,
    /// Where requests name the version, tried in this order; the first that names one
    /// decides.
    #[serde(default = "default_strategies")]
    pub strategies: Vec<VersionStrategy>,
    /// The header of the `header` strategy.
    #[serde(default = "default_header")]
    pub header: String,
    /// The query parameter of the `query` strategy.
    #[serde(default = "default_query")]
    pub query: String,
    /// The vendor of the `accept` strategy's media type (defaults to the API's name).
    #[serde(default)]
    pub vendor: Option<String>,
    /// The version of a request that names none. Without it, such a request matches no
    /// route of the API.
    #[serde(default)]
    pub default: Option<String>,
    /// The versions.
    pub versions: Vec<ApiVersionConfig>,
}

fn default_strategies() -> Vec<VersionStrategy> {
    vec![
        VersionStrategy::Path,
        VersionStrategy::Header,
        VersionStrategy::Accept,
        VersionStrategy::Query,
    ]
}
fn default_header() -> String {
    "x-api-version".into()
}
fn default_query() -> String {
    "api-version".into()
}

/// The version a route serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteVersion {
    /// The versioned API (`versioning[].name`).
    pub api: String,
    /// The version.
    pub name: String,
}

/// A version name as compared: without a leading `v` or `V`.
pub fn canonical_version(v: &str) -> &str {
    let v = v.trim();
    match v.strip_prefix(['v', 'V']) {
        Some(rest) if !rest.is_empty() => rest,
        _ => v,
    }
}

/// Parses an RFC 3339 moment (`2026-06-01T00:00:00Z`) to Unix seconds.
pub fn parse_moment(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("`{s}` is not an RFC 3339 date-time (2026-06-01T00:00:00Z)"))?;
    Ok(t.unix_timestamp())
}

impl VersionedApiConfig {
    /// Checks the API; errors carry paths under `at`.
    pub fn check(&self, at: &str) -> Vec<crate::ConfigError> {
        let mut errors = Vec::new();
        let mut err = |path: String, why: String| errors.push(crate::ConfigError::at(path, why));
        if self.name.is_empty() {
            err(format!("{at}.name"), "must not be empty".into());
        }
        if self.strategies.is_empty() {
            err(
                format!("{at}.strategies"),
                "name at least one strategy".into(),
            );
        }
        if http::HeaderName::from_bytes(self.header.as_bytes()).is_err() {
            err(
                format!("{at}.header"),
                format!("`{}` is not a header name", self.header),
            );
        }
        if self.query.is_empty() {
            err(format!("{at}.query"), "must not be empty".into());
        }
        let names: Vec<&str> = self
            .versions
            .iter()
            .map(|v| canonical_version(&v.name))
            .collect();
        let known = |v: &str| names.contains(&canonical_version(v));
        for (i, v) in self.versions.iter().enumerate() {
            let p = format!("{at}.versions[{i}]");
            let name = canonical_version(&v.name);
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                err(
                    format!("{p}.name"),
                    "a version is letters, digits, `.`, `-` and `_`".into(),
                );
            } else if self.strategies.contains(&VersionStrategy::Path)
                && !name.starts_with(|c: char| c.is_ascii_digit())
            {
                err(
                    format!("{p}.name"),
                    format!(
                        "`{}` cannot be named in a path (`/v<digits>...`): start it with a digit",
                        v.name
                    ),
                );
            } else if names
                .iter()
                .filter(|n| **n == canonical_version(&v.name))
                .count()
                > 1
            {
                err(
                    format!("{p}.name"),
                    format!("version `{}` is listed twice", v.name),
                );
            }
            for (field, value) in [("deprecated", &v.deprecated), ("sunset", &v.sunset)] {
                if let Some(s) = value
                    && let Err(e) = parse_moment(s)
                {
                    err(format!("{p}.{field}"), e);
                }
            }
            if let Some(s) = &v.successor
                && !known(s)
            {
                err(
                    format!("{p}.successor"),
                    format!("`{s}` is not a version of `{}`", self.name),
                );
            }
            if let Some(l) = &v.link
                && (l.contains(['<', '>', '"']) || l.chars().any(char::is_control))
            {
                err(
                    format!("{p}.link"),
                    "not a URL that fits in a Link header".into(),
                );
            }
        }
        if let Some(d) = &self.default
            && !known(d)
        {
            err(
                format!("{at}.default"),
                format!("`{d}` is not a version of `{}`", self.name),
            );
        }
        errors
    }
}
