//! Alert rules (`observability.analytics.alerts`) evaluated periodically over the rollups in
//! the store (so every node sees the whole cluster's traffic), the gateway's upstream health
//! and the plan quota counts; notifications POSTed as JSON to webhooks, with a cooldown and a
//! resolve message; every transition recorded in the alert history.
//!
//! Several nodes may evaluate the same rules: the transition is a conditional update of the
//! shared `alert_state` row, and only the node whose update changed it records the history
//! entry and notifies, so a cluster sends one notification per transition.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use serde_json::json;
use turnpike_model::observe::analytics::{AlertKind, AlertRule, AlertsConfig};
use turnpike_proxy::gateway::Gateway;
use turnpike_proxy::policy::jwt::JsonPoster;
use turnpike_proxy::quota::SystemClock;
use turnpike_store::{AlertEvent, AlertState, RollupFilter, Step, Store};

use crate::analytics::{SharedClock, totals};

/// A rule's measurement: the value, and whether it breaches the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measure {
    /// The measured value (its unit depends on the rule's kind).
    pub value: f64,
    /// Whether the rule fires.
    pub firing: bool,
}

/// The alert evaluator of one node.
pub struct Alerts {
    store: Store,
    config: AlertsConfig,
    poster: JsonPoster,
    clock: Mutex<SharedClock>,
    gateway: Mutex<Weak<Gateway>>,
    /// How long after a minute closes its rows are surely in the store (the nodes'
    /// flush interval and a margin); rules read only minutes older than that.
    settle_ms: std::sync::atomic::AtomicI64,
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[allow(clippy::cast_precision_loss)]
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// RFC 3339 (UTC, milliseconds) of epoch milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

impl Alerts {
    /// An evaluator of `config`'s rules over `store`.
    pub fn new(store: Store, config: AlertsConfig) -> Result<Arc<Self>, String> {
        let poster = JsonPoster::new(config.webhook_timeout)?;
        Ok(Arc::new(Self {
            store,
            config,
            poster,
            clock: Mutex::new(Arc::new(SystemClock)),
            gateway: Mutex::new(Weak::new()),
            settle_ms: std::sync::atomic::AtomicI64::new(0),
        }))
    }

    /// Reads only minutes that closed at least `settle` ago: a minute is written by each
    /// node at its next flush, so a younger one may still be missing rows and would look
    /// like a traffic drop.
    pub fn set_settle(&self, settle: std::time::Duration) {
        self.settle_ms
            .store(millis(settle), std::sync::atomic::Ordering::Relaxed);
    }

    /// Replaces the clock (tests).
    pub fn set_clock(&self, clock: SharedClock) {
        *self.clock.lock().unwrap_or_else(PoisonError::into_inner) = clock;
    }

    /// The gateway whose upstreams and plan quotas `upstream_health` and `quota_usage`
    /// rules watch.
    pub fn set_gateway(&self, gateway: &Arc<Gateway>) {
        *self.gateway.lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(gateway);
    }

    fn now_ms(&self) -> i64 {
        self.clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .now_ms()
    }

    fn gateway(&self) -> Option<Arc<Gateway>> {
        self.gateway
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()
    }

    /// Measures one rule now. `Ok(None)`: nothing to judge (no such upstream yet).
    pub async fn measure(&self, rule: &AlertRule) -> Result<Option<Measure>, String> {
        let now = self.now_ms();
        // Closed and flushed minutes only: the current one is still being counted, and a
        // just-closed one may not be in the store yet.
        let settle = self.settle_ms.load(std::sync::atomic::Ordering::Relaxed);
        let end = Step::Minute.floor(now.saturating_sub(settle));
        let window = millis(rule.window);
        let filter = RollupFilter {
            service: rule.service.clone(),
            route: rule.route.clone(),
            application: rule.application.clone(),
            scope: None,
        };
        let read = |from: i64, to: i64| {
            let filter = filter.clone();
            async move {
                self.store
                    .rollups_at(Step::Minute, from, to, &filter)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let t = rule.threshold;
        Ok(Some(match rule.kind {
            AlertKind::ErrorRate => {
                let (n, e4, e5, _) = totals(&read(end - window, end).await?);
                let errors = if rule.include_4xx { e4 + e5 } else { e5 };
                let value = ratio(errors, n);
                Measure {
                    value,
                    firing: n >= rule.min_requests && value > t,
                }
            }
            AlertKind::P99Latency => {
                let (n, _, _, sketch) = totals(&read(end - window, end).await?);
                let value = sketch.quantile(0.99).unwrap_or(0.0) / 1000.0;
                Measure {
                    value,
                    firing: n >= rule.min_requests && value > t,
                }
            }
            AlertKind::TrafficDrop | AlertKind::TrafficSpike => {
                let (now_n, ..) = totals(&read(end - window, end).await?);
                let (prev_n, ..) = totals(&read(end - 2 * window, end - window).await?);
                let value = ratio(now_n, prev_n);
                let judged = prev_n >= rule.min_requests;
                let firing = judged
                    && if rule.kind == AlertKind::TrafficDrop {
                        value < t
                    } else {
                        value > t
                    };
                Measure { value, firing }
            }
            AlertKind::UpstreamHealth => {
                let name = rule.upstream.as_deref().unwrap_or_default();
                let Some((healthy, _)) = self.gateway().and_then(|g| g.upstream_health(name))
                else {
                    return Ok(None);
                };
                #[allow(clippy::cast_precision_loss)]
                let value = healthy as f64;
                Measure {
                    value,
                    firing: value <= t,
                }
            }
            AlertKind::QuotaUsage => {
                let Some(gateway) = self.gateway() else {
                    return Ok(None);
                };
                let value = self.quota_share(&gateway, rule, now).await?;
                Measure {
                    value,
                    firing: value >= t && value > 0.0,
                }
            }
        }))
    }

    /// The highest share of a plan quota used by an approved subscription (of
    /// `rule.application` only, when set) in its current period.
    async fn quota_share(
        &self,
        gateway: &Gateway,
        rule: &AlertRule,
        now: i64,
    ) -> Result<f64, String> {
        let managed = gateway.managed();
        let since = turnpike_model::mgmt::QuotaPeriod::Day
            .bounds(now)
            .0
            .min(turnpike_model::mgmt::QuotaPeriod::Month.bounds(now).0);
        let usage = self
            .store
            .usage_since(since)
            .await
            .map_err(|e| e.to_string())?;
        let mut worst: f64 = 0.0;
        for ((app, service), plan) in &managed.subscriptions {
            if rule.application.as_ref().is_some_and(|a| **a != **app)
                || rule.service.as_ref().is_some_and(|s| **s != **service)
            {
                continue;
            }
            let Some(quotas) = plan.as_ref().and_then(|p| managed.plan_quotas.get(p)) else {
                continue;
            };
            for q in quotas.iter() {
                let start = q.period.bounds(now).0;
                let used = usage
                    .iter()
                    .find(|u| {
                        *u.application == **app
                            && *u.service == **service
                            && u.period == q.period.as_str()
                            && u.period_start == start
                    })
                    .map_or(0, |u| u64::try_from(u.used).unwrap_or(0));
                worst = worst.max(ratio(used, q.requests));
            }
        }
        Ok(worst)
    }

    /// Evaluates every rule once, notifying and recording transitions.
    pub async fn evaluate(&self) {
        for rule in &self.config.rules {
            if let Err(e) = self.evaluate_rule(rule).await {
                tracing::warn!(rule = %rule.name, error = %e, "alert rule not evaluated");
            }
        }
    }

    async fn evaluate_rule(&self, rule: &AlertRule) -> Result<(), String> {
        let Some(m) = self.measure(rule).await? else {
            return Ok(());
        };
        let now = self.now_ms();
        let err = |e: turnpike_store::StoreError| e.to_string();
        let previous = self.store.alert_state(&rule.name).await.map_err(err)?;
        let was_firing = previous.as_ref().is_some_and(|p| p.state == "firing");
        if m.firing == was_firing {
            return Ok(());
        }
        let (next, notify) = if m.firing {
            let last = previous.as_ref().map_or(0, |p| p.notified_at);
            let notify = last == 0 || now.saturating_sub(last) >= millis(rule.cooldown);
            (
                AlertState {
                    rule: rule.name.clone(),
                    state: "firing".into(),
                    since: now,
                    notified_at: if notify { now } else { last },
                    notified: notify,
                },
                notify,
            )
        } else {
            let Some(p) = previous.as_ref() else {
                return Ok(());
            };
            (
                AlertState {
                    rule: rule.name.clone(),
                    state: "resolved".into(),
                    since: now,
                    notified_at: p.notified_at,
                    notified: false,
                },
                // A resolve is sent only for a firing that was sent.
                p.notified,
            )
        };
        if !self
            .store
            .transition_alert(previous.as_ref(), &next)
            .await
            .map_err(err)?
        {
            // Another node made this transition (and notifies).
            return Ok(());
        }
        let kind = serde_json::to_value(rule.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let event = AlertEvent {
            id: uuid::Uuid::now_v7().to_string(),
            rule: rule.name.clone(),
            kind: kind.clone(),
            state: next.state.clone(),
            value: m.value,
            threshold: rule.threshold,
            at: now,
            notified: notify,
        };
        self.store.add_alert_event(&event).await.map_err(err)?;
        tracing::info!(rule = %rule.name, state = %next.state, value = m.value, "alert");
        if notify {
            let body = json!({
                "rule": rule.name,
                "kind": kind,
                "state": next.state,
                "value": m.value,
                "threshold": rule.threshold,
                "time": rfc3339(now),
                "window_seconds": rule.window.as_secs(),
                "service": rule.service,
                "route": rule.route,
                "application": rule.application,
                "upstream": rule.upstream,
                "message": message(rule, &kind, &next.state, m.value),
            })
            .to_string();
            for url in &rule.webhooks {
                if let Err(e) = self.poster.post(url, body.clone()).await {
                    // Webhook URLs often carry their secret in the path: log the origin only.
                    let origin = url.split('/').take(3).collect::<Vec<_>>().join("/");
                    tracing::warn!(rule = %rule.name, webhook = %origin, error = %e, "alert webhook failed");
                }
            }
        }
        let keep = millis(self.config.history_retention);
        if let Err(e) = self
            .store
            .prune_alert_history(now.saturating_sub(keep))
            .await
        {
            tracing::debug!(error = %e, "cannot prune alert history");
        }
        Ok(())
    }
}

fn message(rule: &AlertRule, kind: &str, state: &str, value: f64) -> String {
    if state == "firing" {
        format!(
            "{}: {kind} is {value:.4} (threshold {})",
            rule.name, rule.threshold
        )
    } else {
        format!("{}: resolved, {kind} is {value:.4}", rule.name)
    }
}
