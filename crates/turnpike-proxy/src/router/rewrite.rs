//! Rewrites: how the path sent upstream is derived from the normalised path that matched.

use regex::Regex;
use turnpike_model::{ConfigError, PathRewrite};

use super::matchers::{PathMatcher, check_param_name};
use super::normalize::{clean_rewritten, normalize_path};

/// A compiled rewrite.
pub(super) enum Rewrite {
    None,
    StripPrefix,
    Template(Vec<Part>),
    Regex {
        pattern: Regex,
        replacement: String,
    },
    /// Stored without a trailing slash: the path it is joined to always starts with one.
    AddPrefix(String),
}

pub(super) enum Part {
    Literal(String),
    Param(String),
}

impl Rewrite {
    /// Compiles the rewrite of route `p` (like `routes[3]`), checking it against the route's
    /// path matchers.
    pub(super) fn compile(
        config: Option<&PathRewrite>,
        paths: &[Option<PathMatcher>],
        p: &str,
        errors: &mut Vec<ConfigError>,
    ) -> Self {
        let Some(config) = config else {
            return Self::None;
        };
        match config {
            PathRewrite::StripPrefix(false) => Self::None,
            PathRewrite::StripPrefix(true) => {
                if paths.is_empty()
                    || !paths
                        .iter()
                        .all(|m| matches!(m, Some(PathMatcher::Prefix(_)) | None))
                {
                    errors.push(ConfigError::at(
                        format!("{p}.rewrite.strip_prefix"),
                        "needs every path of the route to be a `prefix`",
                    ));
                }
                Self::StripPrefix
            }
            PathRewrite::Template(t) => {
                let at = format!("{p}.rewrite.template");
                match parse_template(t) {
                    Err(m) => {
                        errors.push(ConfigError::at(at, m));
                        Self::None
                    }
                    Ok(parts) => {
                        check_template_params(&parts, paths, &at, errors);
                        Self::Template(parts)
                    }
                }
            }
            PathRewrite::Regex {
                pattern,
                replacement,
            } => match Regex::new(pattern) {
                Ok(re) => Self::Regex {
                    pattern: re,
                    replacement: replacement.clone(),
                },
                Err(e) => {
                    errors.push(ConfigError::at(
                        format!("{p}.rewrite.regex.pattern"),
                        format!("invalid regex: {e}"),
                    ));
                    Self::None
                }
            },
            PathRewrite::AddPrefix(prefix) => match normalize_path(prefix) {
                Ok(norm) => Self::AddPrefix(norm.trim_end_matches('/').to_owned()),
                Err(e) => {
                    errors.push(ConfigError::at(
                        format!("{p}.rewrite.add_prefix"),
                        format!("invalid prefix `{prefix}`: {}", e.0),
                    ));
                    Self::None
                }
            },
        }
    }

    /// The path to send upstream. `matched` is the path matcher that matched, if any.
    pub(super) fn apply(
        &self,
        path: &str,
        matched: Option<&PathMatcher>,
        params: &[(String, String)],
    ) -> String {
        match self {
            Self::None => path.to_owned(),
            Self::StripPrefix => {
                let rest = match matched {
                    Some(PathMatcher::Prefix(prefix)) => path.strip_prefix(prefix.as_str()),
                    _ => None,
                };
                match rest {
                    None => path.to_owned(),
                    Some(rest) if rest.starts_with('/') => rest.to_owned(),
                    Some(rest) => {
                        let mut out = String::with_capacity(rest.len() + 1);
                        out.push('/');
                        out.push_str(rest);
                        out
                    }
                }
            }
            Self::Template(parts) => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        Part::Literal(l) => out.push_str(l),
                        Part::Param(name) => {
                            if let Some((_, v)) = params.iter().find(|(n, _)| n == name) {
                                out.push_str(v);
                            }
                        }
                    }
                }
                clean_rewritten(out)
            }
            Self::Regex {
                pattern,
                replacement,
            } => clean_rewritten(pattern.replace(path, replacement.as_str()).into_owned()),
            Self::AddPrefix(prefix) => {
                let mut out = String::with_capacity(prefix.len() + path.len());
                out.push_str(prefix);
                out.push_str(path);
                out
            }
        }
    }
}

/// Parses `/v2/users/{id}`; `{name*}` is accepted as `{name}` so a template can echo the
/// spelling of the path template it pairs with.
fn parse_template(t: &str) -> Result<Vec<Part>, String> {
    if !t.starts_with('/') {
        return Err(format!("template `{t}` must start with `/`"));
    }
    let mut parts = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                parts.push(Part::Literal(rest.to_owned()));
                break;
            }
            Some(i) => {
                let (literal, tail) = rest.split_at(i);
                if !literal.is_empty() {
                    parts.push(Part::Literal(literal.to_owned()));
                }
                let Some(body) = tail.strip_prefix('{') else {
                    return Err(format!("template `{t}` has an unmatched `}}`"));
                };
                let Some((name, after)) = body.split_once('}') else {
                    return Err(format!("template `{t}` has an unclosed `{{`"));
                };
                let name = name.strip_suffix('*').unwrap_or(name);
                check_param_name(name, t)?;
                parts.push(Part::Param(name.to_owned()));
                rest = after;
            }
        }
    }
    Ok(parts)
}

/// Every parameter the template uses must be captured by every path matcher of the route:
/// otherwise some requests would be forwarded with a hole in their path.
fn check_template_params(
    parts: &[Part],
    paths: &[Option<PathMatcher>],
    at: &str,
    errors: &mut Vec<ConfigError>,
) {
    for part in parts {
        let Part::Param(name) = part else { continue };
        if paths.is_empty() {
            errors.push(ConfigError::at(
                at,
                format!("parameter `{name}` is not captured: the route has no paths"),
            ));
            continue;
        }
        for (j, matcher) in paths.iter().enumerate() {
            // A matcher that failed to compile already has its own error.
            let Some(matcher) = matcher else { continue };
            if !matcher.param_names().contains(&name.as_str()) {
                errors.push(ConfigError::at(
                    at,
                    format!("parameter `{name}` is not captured by `paths[{j}]`"),
                ));
            }
        }
    }
}
