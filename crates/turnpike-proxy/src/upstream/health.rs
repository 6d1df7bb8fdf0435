//! Target resolution, active health checks, passive outlier ejection, DNS refresh.
//!
//! PLACEHOLDER: resolution only; replaced by the real checkers.

use std::sync::{Arc, Weak};

use turnpike_model::UpstreamConfig;

use super::{Outcome, Target, Upstream};

/// Resolves every configured target to socket addresses.
pub async fn resolve_targets(config: &UpstreamConfig) -> Result<Vec<Arc<Target>>, String> {
    let mut out = Vec::new();
    for t in &config.targets {
        let (host, port) = t
            .address
            .rsplit_once(':')
            .ok_or_else(|| format!("bad target `{}`", t.address))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("bad port in `{}`", t.address))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addrs = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve `{}`: {e}", t.address))?;
        for addr in addrs {
            out.push(Arc::new(Target::new(addr, host.clone(), port, t.weight)));
        }
    }
    Ok(out)
}

/// Starts background tasks for `upstream`.
pub fn spawn_background(_upstream: Weak<Upstream>) {}

/// Records an attempt's outcome.
pub fn record(
    _target: &Target,
    _passive: Option<&turnpike_model::PassiveHealthCheck>,
    _outcome: Outcome,
) {
}
