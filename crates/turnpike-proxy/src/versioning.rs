//! What a route serving a version of a versioned API tells its clients: `Deprecation`
//! (RFC 9745), `Sunset` (RFC 8594) and `Link` headers on a deprecated version, and 410
//! `api_retired` naming the successor on a retired one. Which route a request reaches is the
//! router's business (see [`crate::router`]).

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, header};
use turnpike_model::RouteConfig;
use turnpike_model::versioning::{
    VersionStrategy, VersionedApiConfig, canonical_version, parse_moment,
};

use crate::error::{ErrorKind, GatewayError};

/// The version a route serves, with its announcements ready to send.
#[derive(Debug)]
pub struct VersionFacts {
    api: String,
    version: String,
    /// Whether the API reads versions from the path (successor links can then be built).
    path_strategy: bool,
    deprecation: Option<HeaderValue>,
    sunset: Option<HeaderValue>,
    link: Option<HeaderValue>,
    retired: bool,
    successor: Option<String>,
    /// The request headers that choose the version (`Vary`).
    vary: Vec<HeaderValue>,
}

impl VersionFacts {
    /// The facts of `route`'s version, if it serves one (the config was validated).
    pub fn of(route: &RouteConfig, versioning: &[VersionedApiConfig]) -> Option<Arc<Self>> {
        let v = route.api_version.as_ref()?;
        let api = versioning.iter().find(|a| a.name == v.api)?;
        let name = canonical_version(&v.name);
        let cfg = api
            .versions
            .iter()
            .find(|x| canonical_version(&x.name) == name)?;
        let moment = |s: &Option<String>| s.as_deref().and_then(|s| parse_moment(s).ok());
        Some(Arc::new(Self {
            api: api.name.clone(),
            version: name.to_owned(),
            path_strategy: api.strategies.contains(&VersionStrategy::Path),
            deprecation: moment(&cfg.deprecated)
                .and_then(|t| HeaderValue::from_str(&format!("@{t}")).ok()),
            sunset: moment(&cfg.sunset).and_then(|t| {
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
                HeaderValue::from_str(&httpdate::fmt_http_date(at)).ok()
            }),
            link: cfg.link.as_deref().and_then(|l| {
                HeaderValue::from_str(&format!("<{l}>; rel=\"deprecation\"; type=\"text/html\""))
                    .ok()
            }),
            retired: cfg.retired,
            successor: cfg
                .successor
                .as_deref()
                .map(|s| canonical_version(s).to_owned()),
            vary: api
                .strategies
                .iter()
                .filter_map(|s| match s {
                    VersionStrategy::Header => HeaderValue::from_str(&api.header).ok(),
                    VersionStrategy::Accept => Some(HeaderValue::from_static("accept")),
                    VersionStrategy::Path | VersionStrategy::Query => None,
                })
                .collect(),
        }))
    }

    /// `Link: </v2/rest>; rel="successor-version"` when the client named the version in the
    /// path (`path` is the normalised request path); other strategies have no URL to give.
    fn successor_link(&self, path: &str) -> Option<HeaderValue> {
        let successor = self.successor.as_deref()?;
        if !self.path_strategy {
            return None;
        }
        let rest = path
            .strip_prefix("/v")
            .or_else(|| path.strip_prefix("/V"))?
            .strip_prefix(self.version.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        HeaderValue::from_str(&format!("</v{successor}{rest}>; rel=\"successor-version\"")).ok()
    }

    /// Refuses a request for a retired version (410), or adds the deprecation headers of a
    /// deprecated one to `out` (headers for every answer the client gets).
    pub fn check(&self, path: &str, out: &mut HeaderMap) -> Result<(), GatewayError> {
        // The same URL answers differently by these headers: caches must keep them apart.
        for v in &self.vary {
            out.append(header::VARY, v.clone());
        }
        let link = self.successor_link(path);
        if self.retired {
            if let Some(l) = link {
                out.append(header::LINK, l);
            }
            let message = match &self.successor {
                Some(s) => format!(
                    "version `{}` of `{}` is retired; use version `{s}`",
                    self.version, self.api
                ),
                None => format!("version `{}` of `{}` is retired", self.version, self.api),
            };
            return Err(GatewayError::new(ErrorKind::ApiRetired, message));
        }
        if let Some(d) = &self.deprecation {
            out.insert(HeaderName::from_static("deprecation"), d.clone());
            if let Some(s) = &self.sunset {
                out.insert(HeaderName::from_static("sunset"), s.clone());
            }
            for l in self.link.iter().cloned().chain(link) {
                out.append(header::LINK, l);
            }
        } else if let Some(s) = &self.sunset {
            out.insert(HeaderName::from_static("sunset"), s.clone());
        }
        Ok(())
    }
}
