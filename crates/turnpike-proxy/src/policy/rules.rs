//! Admission and authorization rules: `ip_restriction`, `user_agent`, `request_size` and
//! `acl`.

use std::net::IpAddr;

use http::{HeaderMap, header};
use ipnet::IpNet;
use regex::RegexSet;
use turnpike_model::policy::{AclConfig, IpRestrictionConfig, UserAgentConfig, parse_cidr};

use super::Identity;
use crate::error::{ErrorKind, GatewayError};

/// `ip_restriction`, compiled.
pub struct IpRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpRules {
    /// Compiles the CIDR lists.
    pub fn new(c: &IpRestrictionConfig) -> Result<Self, (String, String)> {
        let parse = |field: &str, list: &[String]| {
            list.iter()
                .enumerate()
                .map(|(i, s)| parse_cidr(s).map_err(|e| (format!("{field}[{i}]"), e)))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            allow: parse("allow", &c.allow)?,
            deny: parse("deny", &c.deny)?,
        })
    }

    /// Refuses `ip` when denied, or when an allow list exists and does not hold it.
    pub fn check(&self, ip: IpAddr) -> Result<(), GatewayError> {
        let ip = ip.to_canonical();
        let denied = self.deny.iter().any(|n| n.contains(&ip))
            || (!self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)));
        if denied {
            return Err(GatewayError::new(
                ErrorKind::IpDenied,
                "requests from this address are not allowed",
            ));
        }
        Ok(())
    }
}

/// `user_agent`, compiled.
pub struct UserAgentRules {
    deny: RegexSet,
    allow: RegexSet,
    deny_missing: bool,
}

impl UserAgentRules {
    /// Compiles the patterns.
    pub fn new(c: &UserAgentConfig) -> Result<Self, (String, String)> {
        let set = |field: &str, list: &[String]| {
            for (i, p) in list.iter().enumerate() {
                turnpike_model::policy::user_regex(p).map_err(|e| (format!("{field}[{i}]"), e))?;
            }
            regex::RegexSetBuilder::new(list)
                .size_limit(4 << 20)
                .build()
                .map_err(|e| (field.to_owned(), e.to_string()))
        };
        Ok(Self {
            deny: set("deny", &c.deny)?,
            allow: set("allow", &c.allow)?,
            deny_missing: c.deny_missing,
        })
    }

    /// Refuses a denied or (when so configured) missing `User-Agent`.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), GatewayError> {
        let refuse = || {
            GatewayError::new(
                ErrorKind::UserAgentDenied,
                "requests from this client are not allowed",
            )
        };
        let Some(ua) = headers.get(header::USER_AGENT) else {
            return if self.deny_missing {
                Err(refuse())
            } else {
                Ok(())
            };
        };
        let ua = String::from_utf8_lossy(ua.as_bytes());
        if self.allow.is_match(&ua) {
            return Ok(());
        }
        if self.deny.is_match(&ua) {
            return Err(refuse());
        }
        Ok(())
    }
}

/// `request_size`: refuses a declared body over `max` at once. A body without a length (or
/// lying about it) is cut at the same limit while it streams, because the route's body
/// limit is lowered to it (see the proxy).
pub fn check_size(headers: &HeaderMap, max: u64) -> Result<(), GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(GatewayError::new(
            ErrorKind::BodyTooLarge,
            format!("request body exceeds {max} bytes"),
        ));
    }
    Ok(())
}

/// `acl`, compiled.
pub struct Acl {
    config: AclConfig,
}

impl Acl {
    /// Compiles the policy.
    pub fn new(config: AclConfig) -> Self {
        Self { config }
    }

    /// Checks groups, scopes and claims of the caller.
    pub fn check(&self, identity: &Identity) -> Result<(), GatewayError> {
        let c = &self.config;
        let groups: &[String] = identity
            .consumer
            .as_ref()
            .map_or(&[], |c| c.groups.as_slice());
        if groups.iter().any(|g| c.deny_groups.contains(g)) {
            return Err(GatewayError::new(
                ErrorKind::AccessDenied,
                "this application may not use this API",
            ));
        }
        if !c.allow_groups.is_empty() && !groups.iter().any(|g| c.allow_groups.contains(g)) {
            return Err(GatewayError::new(
                ErrorKind::AccessDenied,
                "this application may not use this API",
            ));
        }
        if let Some(missing) = c
            .required_scopes
            .iter()
            .find(|s| !identity.scopes.contains(s))
        {
            return Err(GatewayError::new(
                ErrorKind::InsufficientScope,
                format!("the credential lacks scope `{missing}`"),
            ));
        }
        for (claim, accepted) in &c.required_claims {
            let value = identity.claims.as_ref().and_then(|m| m.get(claim));
            let ok = match value {
                Some(serde_json::Value::String(s)) => accepted.is_empty() || accepted.contains(s),
                Some(serde_json::Value::Array(a)) => a.iter().any(|v| {
                    v.as_str()
                        .is_some_and(|s| accepted.is_empty() || accepted.iter().any(|x| x == s))
                }),
                Some(serde_json::Value::Bool(b)) => {
                    accepted.is_empty() || accepted.contains(&b.to_string())
                }
                Some(serde_json::Value::Number(n)) => {
                    accepted.is_empty() || accepted.contains(&n.to_string())
                }
                _ => false,
            };
            if !ok {
                return Err(GatewayError::new(
                    ErrorKind::InsufficientScope,
                    format!("the credential's `{claim}` claim does not allow this"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use turnpike_model::managed::Consumer;

    #[test]
    fn ip_rules() {
        let r = IpRules::new(&IpRestrictionConfig {
            allow: vec!["10.0.0.0/8".into(), "::1".into()],
            deny: vec!["10.9.0.0/16".into()],
        })
        .unwrap();
        assert!(r.check("10.1.2.3".parse().unwrap()).is_ok());
        assert!(r.check("::ffff:10.1.2.3".parse().unwrap()).is_ok());
        assert!(r.check("::1".parse().unwrap()).is_ok());
        assert_eq!(
            r.check("10.9.1.1".parse().unwrap()).unwrap_err().kind,
            ErrorKind::IpDenied
        );
        assert!(r.check("192.0.2.1".parse().unwrap()).is_err());
    }

    #[test]
    fn user_agents() {
        let r = UserAgentRules::new(&UserAgentConfig {
            deny: vec!["(?i)curl".into(), "sqlmap".into()],
            allow: vec!["^curl/8\\.0-trusted".into()],
            deny_missing: true,
        })
        .unwrap();
        let mut h = HeaderMap::new();
        assert!(r.check(&h).is_err());
        h.insert(header::USER_AGENT, "Mozilla/5.0".parse().unwrap());
        assert!(r.check(&h).is_ok());
        h.insert(header::USER_AGENT, "CURL/7".parse().unwrap());
        assert!(r.check(&h).is_err());
        h.insert(header::USER_AGENT, "curl/8.0-trusted".parse().unwrap());
        assert!(r.check(&h).is_ok());
    }

    #[test]
    fn acl_groups_scopes_claims() {
        let acl = Acl::new(AclConfig {
            allow_groups: vec!["gold".into()],
            deny_groups: vec!["banned".into()],
            required_scopes: vec!["read".into()],
            required_claims: [("tier".to_owned(), vec!["pro".to_owned()])].into(),
        });
        let app = |groups: &[&str]| {
            Some(Arc::new(Consumer {
                id: "a".into(),
                name: "a".into(),
                team: "".into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            }))
        };
        let mut id = Identity {
            consumer: app(&["gold"]),
            scopes: vec!["read".into()],
            claims: Some(
                serde_json::json!({"tier": "pro"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            ..Identity::default()
        };
        assert!(acl.check(&id).is_ok());
        id.consumer = app(&["gold", "banned"]);
        assert_eq!(acl.check(&id).unwrap_err().kind, ErrorKind::AccessDenied);
        id.consumer = app(&["silver"]);
        assert_eq!(acl.check(&id).unwrap_err().kind, ErrorKind::AccessDenied);
        id.consumer = app(&["gold"]);
        id.scopes.clear();
        assert_eq!(
            acl.check(&id).unwrap_err().kind,
            ErrorKind::InsufficientScope
        );
        id.scopes = vec!["read".into()];
        id.claims = Some(
            serde_json::json!({"tier": "free"})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(
            acl.check(&id).unwrap_err().kind,
            ErrorKind::InsufficientScope
        );
    }
}
