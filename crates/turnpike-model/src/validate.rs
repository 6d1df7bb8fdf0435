//! Structural validation: what serde's types cannot express.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use crate::{Config, ConfigError, ConfigErrors, PathMatch, PathRewrite, PredicateTest, Timeouts};

/// Checks names, references and ranges. Returns every problem found, not just the first.
pub fn validate(config: &Config) -> Result<(), ConfigErrors> {
    let mut errs = Vec::new();
    let mut err = |path: String, msg: String| errs.push(ConfigError::at(path, msg));

    if config.version != 1 {
        err(
            "version".into(),
            format!(
                "unsupported version {}; this build reads version 1",
                config.version
            ),
        );
    }

    let server = &config.server;
    let mut names = HashSet::new();
    if server.listeners.is_empty() {
        err(
            "server.listeners".into(),
            "at least one listener is required".into(),
        );
    }
    for (i, l) in server.listeners.iter().enumerate() {
        let p = format!("server.listeners[{i}]");
        if !names.insert(l.name.as_str()) {
            err(
                format!("{p}.name"),
                format!("duplicate listener name `{}`", l.name),
            );
        }
        if l.address.parse::<SocketAddr>().is_err() {
            err(
                format!("{p}.address"),
                format!("`{}` is not an `ip:port` socket address", l.address),
            );
        }
        if let Some(tls) = &l.tls {
            if tls.certificates.is_empty() {
                err(
                    format!("{p}.tls.certificates"),
                    "at least one certificate is required".into(),
                );
            }
            if let Some(ca) = &tls.client_auth {
                if ca.ca.is_empty() {
                    err(
                        format!("{p}.tls.client_auth.ca"),
                        "name a PEM file of CA certificates".into(),
                    );
                }
                for (j, crl) in ca.crls.iter().enumerate() {
                    if crl.is_empty() {
                        err(
                            format!("{p}.tls.client_auth.crls[{j}]"),
                            "must not be empty".into(),
                        );
                    }
                }
            }
        }
        if l.max_connections == Some(0) {
            err(format!("{p}.max_connections"), "must be at least 1".into());
        }
    }

    let limits = &server.limits;
    for (field, value) in [
        ("max_header_bytes", limits.max_header_bytes),
        ("max_headers", limits.max_headers),
        ("max_uri_length", limits.max_uri_length),
        ("max_connections", limits.max_connections),
        (
            "h2_max_concurrent_streams",
            limits.h2_max_concurrent_streams as usize,
        ),
    ] {
        if value == 0 {
            err(
                format!("server.limits.{field}"),
                "must be at least 1".into(),
            );
        }
    }
    if limits.max_header_bytes < 1024 {
        err(
            "server.limits.max_header_bytes".into(),
            "must be at least 1024".into(),
        );
    }
    if limits.header_read_timeout.is_zero() {
        err(
            "server.limits.header_read_timeout".into(),
            "must be positive".into(),
        );
    }

    for (i, cidr) in server.trusted_proxies.iter().enumerate() {
        if parse_cidr(cidr).is_none() {
            err(
                format!("server.trusted_proxies[{i}]"),
                format!("`{cidr}` is not an IP address or CIDR"),
            );
        }
    }
    if http::HeaderName::from_bytes(server.request_id_header.as_bytes()).is_err() {
        err(
            "server.request_id_header".into(),
            format!("`{}` is not a valid header name", server.request_id_header),
        );
    }

    let mut upstreams = HashSet::new();
    for (i, u) in config.upstreams.iter().enumerate() {
        let p = format!("upstreams[{i}]");
        if u.name.is_empty() {
            err(format!("{p}.name"), "must not be empty".into());
        }
        if !upstreams.insert(u.name.as_str()) {
            err(
                format!("{p}.name"),
                format!("duplicate upstream name `{}`", u.name),
            );
        }
        if u.targets.is_empty() {
            err(
                format!("{p}.targets"),
                "at least one target is required".into(),
            );
        }
        for (j, t) in u.targets.iter().enumerate() {
            if let Err(m) = check_host_port(&t.address) {
                err(format!("{p}.targets[{j}].address"), m);
            }
        }
        if !u.targets.is_empty() && u.targets.iter().all(|t| t.weight == 0) {
            err(
                format!("{p}.targets"),
                "at least one target needs a weight above 0".into(),
            );
        }
        if let Some(a) = &u.health_check.active {
            let hp = format!("{p}.health_check.active");
            if !a.path.starts_with('/') {
                err(format!("{hp}.path"), "must start with `/`".into());
            }
            if a.interval.is_zero() || a.timeout.is_zero() {
                err(
                    format!("{hp}.interval"),
                    "interval and timeout must be positive".into(),
                );
            }
            if a.healthy_threshold == 0 || a.unhealthy_threshold == 0 {
                err(
                    format!("{hp}.healthy_threshold"),
                    "thresholds must be at least 1".into(),
                );
            }
            if a.expected_status.is_empty()
                || a.expected_status.iter().any(|s| !(100..600).contains(s))
            {
                err(
                    format!("{hp}.expected_status"),
                    "must list HTTP statuses between 100 and 599".into(),
                );
            }
        }
        if let Some(pass) = &u.health_check.passive {
            if pass.consecutive_failures == 0 {
                err(
                    format!("{p}.health_check.passive.consecutive_failures"),
                    "must be at least 1".into(),
                );
            }
        }
        check_timeouts(&u.timeouts, &format!("{p}.timeouts"), &mut err);
        let r = &u.retries;
        if !(0.0..=1.0).contains(&r.budget_ratio) {
            err(
                format!("{p}.retries.budget_ratio"),
                "must be between 0 and 1".into(),
            );
        }
        if r.attempts > 10 {
            err(
                format!("{p}.retries.attempts"),
                "at most 10 retries are allowed".into(),
            );
        }
        if u.tls.client_cert.is_some() != u.tls.client_key.is_some() {
            err(
                format!("{p}.tls"),
                "client_cert and client_key must be given together".into(),
            );
        }
    }

    let mut routes = HashSet::new();
    for (i, r) in config.routes.iter().enumerate() {
        let p = format!("routes[{i}]");
        if r.name.is_empty() {
            err(format!("{p}.name"), "must not be empty".into());
        }
        if !routes.insert(r.name.as_str()) {
            err(
                format!("{p}.name"),
                format!("duplicate route name `{}`", r.name),
            );
        }
        if !upstreams.contains(r.upstream.as_str()) {
            err(
                format!("{p}.upstream"),
                format!("unknown upstream `{}`", r.upstream),
            );
        }
        for (j, h) in r.hosts.iter().enumerate() {
            if let Err(m) = check_host_pattern(h) {
                err(format!("{p}.hosts[{j}]"), m);
            }
        }
        for (j, m) in r.methods.iter().enumerate() {
            if http::Method::from_bytes(m.as_bytes()).is_err() || m.is_empty() {
                err(
                    format!("{p}.methods[{j}]"),
                    format!("`{m}` is not an HTTP method"),
                );
            }
        }
        for (j, pm) in r.paths.iter().enumerate() {
            let s = match pm {
                PathMatch::Exact(s) | PathMatch::Prefix(s) | PathMatch::Template(s) => s,
                PathMatch::Regex(_) => continue,
            };
            if !s.starts_with('/') {
                err(
                    format!("{p}.paths[{j}]"),
                    format!("path `{s}` must start with `/`"),
                );
            }
        }
        for (kind, preds) in [
            ("headers", &r.headers),
            ("query", &r.query),
            ("cookies", &r.cookies),
        ] {
            for (j, pr) in preds.iter().enumerate() {
                if pr.name.is_empty() {
                    err(format!("{p}.{kind}[{j}].name"), "must not be empty".into());
                }
                if matches!(
                    pr.test,
                    PredicateTest::Present(false) | PredicateTest::Absent(false)
                ) {
                    err(
                        format!("{p}.{kind}[{j}]"),
                        "`present`/`absent` must be `true`".into(),
                    );
                }
            }
        }
        if let Some(PathRewrite::StripPrefix(true)) = &r.rewrite {
            if r.paths.is_empty() || !r.paths.iter().all(|m| matches!(m, PathMatch::Prefix(_))) {
                err(
                    format!("{p}.rewrite.strip_prefix"),
                    "needs every path of the route to be a `prefix`".into(),
                );
            }
        }
        if let Some(PathRewrite::AddPrefix(s)) = &r.rewrite {
            if !s.starts_with('/') {
                err(
                    format!("{p}.rewrite.add_prefix"),
                    "must start with `/`".into(),
                );
            }
        }
        if let Some(t) = &r.timeouts {
            check_timeouts(t, &format!("{p}.timeouts"), &mut err);
        }
    }

    let mut consumers = HashSet::new();
    let mut oauth_clients = HashSet::new();
    let mut hmac_keys = HashSet::new();
    let mut mtls_subjects = HashSet::new();
    let mut mtls_sans = HashSet::new();
    for (i, c) in config.consumers.iter().enumerate() {
        let p = format!("consumers[{i}]");
        if c.name.is_empty() || c.name.contains('/') {
            err(
                format!("{p}.name"),
                "must be a non-empty name without `/`".into(),
            );
        }
        if !consumers.insert(c.name.as_str()) {
            err(
                format!("{p}.name"),
                format!("duplicate consumer name `{}`", c.name),
            );
        }
        for (j, id) in c.oauth_clients.iter().enumerate() {
            if id.is_empty() {
                err(
                    format!("{p}.oauth_clients[{j}]"),
                    "must not be empty".into(),
                );
            } else if !oauth_clients.insert(id.as_str()) {
                err(
                    format!("{p}.oauth_clients[{j}]"),
                    format!("OAuth2 client `{id}` already belongs to a consumer"),
                );
            }
        }
        for (j, k) in c.hmac.iter().enumerate() {
            if k.key_id.is_empty() {
                err(format!("{p}.hmac[{j}].key_id"), "must not be empty".into());
            } else if !hmac_keys.insert(k.key_id.as_str()) {
                err(
                    format!("{p}.hmac[{j}].key_id"),
                    format!("key id `{}` already belongs to a consumer", k.key_id),
                );
            }
            match (&k.secret, &k.secret_env) {
                (Some(s), None) if s.is_empty() => {
                    err(format!("{p}.hmac[{j}].secret"), "must not be empty".into());
                }
                (None, Some(v)) if v.is_empty() => {
                    err(
                        format!("{p}.hmac[{j}].secret_env"),
                        "must not be empty".into(),
                    );
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => err(
                    format!("{p}.hmac[{j}]"),
                    "give exactly one of `secret` and `secret_env`".into(),
                ),
            }
        }
        for (j, m) in c.mtls.iter().enumerate() {
            let (field, value, seen) = match m {
                crate::MtlsIdentity::Subject(s) => ("subject", s.clone(), &mut mtls_subjects),
                crate::MtlsIdentity::San(s) => {
                    ("san", crate::managed::mtls_san_claim(s), &mut mtls_sans)
                }
            };
            if value.is_empty() {
                err(format!("{p}.mtls[{j}].{field}"), "must not be empty".into());
            } else if !seen.insert(value) {
                err(
                    format!("{p}.mtls[{j}].{field}"),
                    format!("this certificate {field} already identifies a consumer"),
                );
            }
        }
        for (j, k) in c.api_keys.iter().enumerate() {
            match k {
                crate::ApiKeyConfig::Sha256(h) => {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        err(
                            format!("{p}.api_keys[{j}].sha256"),
                            "must be 64 hex digits (the SHA-256 of the key)".into(),
                        );
                    }
                }
                crate::ApiKeyConfig::Env(var) => {
                    if std::env::var(var).map_or(true, |v| v.is_empty()) {
                        err(
                            format!("{p}.api_keys[{j}].env"),
                            format!("environment variable `{var}` is not set"),
                        );
                    }
                }
            }
        }
        for (j, b) in c.basic_auth.iter().enumerate() {
            if !b.password_hash.starts_with("$argon2") {
                err(
                    format!("{p}.basic_auth[{j}].password_hash"),
                    "must be an Argon2 hash in PHC form (`$argon2id$...`)".into(),
                );
            }
        }
    }

    let mut policy_names = HashSet::new();
    for (i, pol) in config.policies.iter().enumerate() {
        use crate::mgmt::PolicyScope;
        let p = format!("policies[{i}]");
        if !policy_names.insert((pol.name.as_str(), &pol.scope)) {
            err(
                format!("{p}.name"),
                format!("duplicate policy `{}` at one scope", pol.name),
            );
        }
        match crate::policy::PolicyKind::parse_attachment(&pol.policy_type, &pol.config) {
            Ok(kind) => {
                for (field, name) in kind.upstream_refs() {
                    if !upstreams.contains(name) {
                        err(
                            format!("{p}.config.{field}"),
                            format!("unknown upstream `{name}`"),
                        );
                    }
                }
            }
            Err(e) => {
                for e in e.0 {
                    err(format!("{p}.{}", e.path), e.message);
                }
            }
        }
        if matches!(
            pol.scope,
            PolicyScope::Application(_) | PolicyScope::Plan(_)
        ) && pol.policy_type != "rate_limit"
        {
            err(
                format!("{p}.type"),
                "only rate_limit policies can be attached to an application or plan".into(),
            );
        }
        let known = match &pol.scope {
            PolicyScope::Global => true,
            PolicyScope::Route(r) => routes.contains(r.as_str()),
            PolicyScope::Application(a) => {
                consumers.contains(a.as_str()) || config.managed.consumers.contains_key(a)
            }
            PolicyScope::Service(s) => config.managed.routes.values().any(|b| *b.id == **s),
            PolicyScope::Plan(id) => config
                .managed
                .subscriptions
                .values()
                .any(|p| p.as_ref() == Some(id)),
        };
        if !known {
            err(
                format!("{p}.target"),
                match &pol.scope {
                    PolicyScope::Route(r) => format!("unknown route `{r}`"),
                    PolicyScope::Application(a) => format!("unknown consumer `{a}`"),
                    _ => {
                        "services and plans live in the management store; attach this policy there"
                            .into()
                    }
                },
            );
        }
    }

    for (path, msg) in config.observability.access_log.problems() {
        err(format!("observability.access_log.{path}"), msg);
    }
    if let Err((path, msg)) = config.cache.check() {
        err(format!("cache.{path}"), msg);
    }
    let mut apis = HashSet::new();
    for (i, api) in config.versioning.iter().enumerate() {
        if !apis.insert(api.name.as_str()) {
            err(
                format!("versioning[{i}].name"),
                format!("duplicate versioned API `{}`", api.name),
            );
        }
    }
    for (i, api) in config.versioning.iter().enumerate() {
        errs.extend(api.check(&format!("versioning[{i}]")));
    }
    for (i, r) in config.routes.iter().enumerate() {
        let Some(v) = &r.api_version else {
            continue;
        };
        match config.versioning.iter().find(|a| a.name == v.api) {
            None => errs.push(ConfigError::at(
                format!("routes[{i}].api_version.api"),
                format!("unknown versioned API `{}` (see `versioning`)", v.api),
            )),
            Some(api) => {
                let want = crate::versioning::canonical_version(&v.name);
                if !api
                    .versions
                    .iter()
                    .any(|x| crate::versioning::canonical_version(&x.name) == want)
                {
                    errs.push(ConfigError::at(
                        format!("routes[{i}].api_version.name"),
                        format!("`{}` is not a version of `{}`", v.name, v.api),
                    ));
                }
            }
        }
    }
    errs.extend(config.observability.metrics.validate());
    errs.extend(config.observability.tracing.validate());
    crate::observe::analytics::validate(&config.observability.analytics, &mut errs);

    if errs.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errs))
    }
}

fn check_timeouts(t: &Timeouts, p: &str, err: &mut impl FnMut(String, String)) {
    for (field, d) in [("connect", t.connect), ("read", t.read), ("write", t.write)] {
        if d.is_zero() {
            err(format!("{p}.{field}"), "must be positive".into());
        }
    }
}

/// Parses `10.0.0.0/8` or a bare address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

fn check_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` must be `host:port`"))?;
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("`{s}` has an invalid port"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') || host.contains(' ') {
        return Err(format!("`{s}` has an invalid host"));
    }
    Ok(())
}

fn check_host_pattern(h: &str) -> Result<(), String> {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if rest.is_empty()
        || rest.contains('*')
        || !rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
    {
        return Err(format!("`{h}` is not a host name or `*.domain` pattern"));
    }
    Ok(())
}
