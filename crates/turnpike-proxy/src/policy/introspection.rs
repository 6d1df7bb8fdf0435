//! `oauth2_introspection`: opaque bearer tokens checked by the authorization server's token
//! introspection endpoint (RFC 7662).
//!
//! The token is POSTed as a form (`token`, `token_type_hint`) with the gateway's own client
//! credentials in HTTP basic authentication (RFC 6749 §2.3.1: id and secret form-encoded
//! first). An answer with `active: false` refuses the request; an active one is then checked
//! here for `exp`, `nbf`, and, when configured, `iss` and `aud`, and its client (the
//! `consumer_claim` member, `client_id` by default) is looked up among the `oauth_client`
//! credentials of the store and the file consumers' `oauth_clients`.
//!
//! # Cache
//!
//! Calling the endpoint on every request would put the authorization server on the request
//! path of every API call, so answers are kept:
//!
//! - keyed by the SHA-256 of the token, so the cache never holds a usable token;
//! - an active answer until the earlier of the token's `exp` and `cache_ttl`; an inactive one
//!   for `negative_cache_ttl`; the checks on `exp`/`nbf`/`iss`/`aud` run on every use;
//! - at most `cache_max_entries` answers: past it, expired answers are dropped, then a
//!   batch of arbitrary ones (an attacker sending random tokens can only churn the cache, not
//!   grow it);
//! - at most `max_concurrent_calls` calls in flight: past it, an uncached token gets 503 at
//!   once, so random tokens cannot flood the authorization server;
//! - one call per token at a time: concurrent requests with one uncached token wait for the
//!   same call, which runs as its own task so a client hanging up does not cancel it for the
//!   others.
//!
//! A failed call (timeout, connection refused, an error status, a malformed answer) is never
//! cached as an answer: the requests waiting for it get 503 `auth_unavailable`, and for
//! `failure_backoff` afterwards requests with uncached tokens get the same 503 without a
//! call, so an endpoint in trouble is not hammered. Cached answers keep being used meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Uri};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use turnpike_model::managed::Managed;
use turnpike_model::policy::OAuth2IntrospectionConfig;

use super::Identity;
use super::jwt::remote::Fetcher;
use crate::error::{ErrorKind, GatewayError};

/// What the authorization server said about one token.
#[derive(Debug)]
pub(crate) struct Answer {
    active: bool,
    /// The response's members (`active` included).
    claims: Map<String, Value>,
}

/// A call every waiting request awaits: the answer, or why the call failed.
type Pending = Shared<BoxFuture<'static, Result<Arc<Answer>, String>>>;

type TokenKey = [u8; 32];

struct Cached {
    answer: Arc<Answer>,
    until: Instant,
}

#[derive(Default)]
struct State {
    answers: HashMap<TokenKey, Cached>,
    in_flight: HashMap<TokenKey, Pending>,
    /// No calls before this instant, after a failed one.
    backoff_until: Option<Instant>,
}

/// What a call needs, shared with the task that makes it.
struct Inner {
    endpoint: Uri,
    client_auth: HeaderValue,
    token_type_hint: String,
    fetcher: Fetcher,
    cache_ttl: Duration,
    negative_ttl: Duration,
    max_entries: usize,
    max_calls: usize,
    failure_backoff: Duration,
    state: Mutex<State>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every field stays consistent on its own; a panic elsewhere leaves nothing to repair.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The compiled `oauth2_introspection` policy.
pub struct Introspection {
    /// Its configuration.
    pub config: OAuth2IntrospectionConfig,
    header: HeaderName,
    inner: Arc<Inner>,
}

impl Introspection {
    /// Compiles the policy; the client secret is read from its environment variable now.
    pub fn new(config: OAuth2IntrospectionConfig) -> Result<Self, (String, String)> {
        let endpoint: Uri = config
            .endpoint
            .parse()
            .map_err(|e| ("endpoint".to_owned(), format!("not a URL: {e}")))?;
        let secret = std::env::var(&config.client_secret_env)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                (
                    "client_secret_env".to_owned(),
                    format!(
                        "environment variable `{}` is not set",
                        config.client_secret_env
                    ),
                )
            })?;
        let client_auth = basic_client_auth(&config.client_id, &secret)
            .ok_or_else(|| ("client_id".to_owned(), "not usable in a header".to_owned()))?;
        let header = HeaderName::from_bytes(config.header.as_bytes())
            .map_err(|_| ("header".to_owned(), "not a valid header name".to_owned()))?;
        let fetcher = Fetcher::new(config.timeout, config.max_response_bytes)
            .map_err(|e| ("endpoint".to_owned(), e))?;
        let inner = Arc::new(Inner {
            endpoint,
            client_auth,
            token_type_hint: config.token_type_hint.clone(),
            fetcher,
            cache_ttl: config.cache_ttl,
            negative_ttl: config.negative_cache_ttl,
            max_entries: config.cache_max_entries,
            max_calls: config.max_concurrent_calls,
            failure_backoff: config.failure_backoff,
            state: Mutex::new(State::default()),
        });
        Ok(Self {
            config,
            header,
            inner,
        })
    }

    /// The caller's identity from the request's bearer token: `Ok(None)` without a token.
    pub(super) async fn identify(
        &self,
        managed: &Managed,
        parts: &mut Parts,
    ) -> Result<Option<Identity>, GatewayError> {
        let from_header = parts
            .headers
            .get(&self.header)
            .and_then(|v| super::auth::strip_scheme(v.as_bytes(), b"bearer"))
            .map(|t| String::from_utf8_lossy(t.trim_ascii()).into_owned());
        let (token, in_query) = match from_header {
            Some(t) => (t, false),
            None => match self
                .config
                .query
                .as_deref()
                .and_then(|q| super::auth::query_param(parts.uri.query(), q))
            {
                Some(t) => (t, true),
                None => return Ok(None),
            },
        };
        let invalid = |why: &str| {
            GatewayError::new(
                ErrorKind::CredentialInvalid,
                format!("the bearer token is not valid: {why}"),
            )
        };
        if token.is_empty() {
            return Err(invalid("it is empty"));
        }
        let answer = self.lookup(&token).await?;
        if !answer.active {
            return Err(invalid("it is not active"));
        }
        self.check_claims(&answer.claims, unix_now())
            .map_err(invalid)?;
        if self.config.hide_credentials {
            if in_query {
                if let Some(q) = &self.config.query {
                    super::auth::remove_query_param(&mut parts.uri, q);
                }
            } else {
                parts.headers.remove(&self.header);
            }
        }
        let client = answer
            .claims
            .get(&self.config.consumer_claim)
            .and_then(Value::as_str);
        let consumer = client.and_then(|c| managed.oauth_clients.get(c)).cloned();
        if consumer.is_none() && self.config.require_application {
            return Err(invalid("its client maps to no application"));
        }
        let scopes = answer
            .claims
            .get("scope")
            .and_then(Value::as_str)
            .map(|s| s.split_ascii_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let subject = answer.claims.get("sub").and_then(Value::as_str);
        Ok(Some(Identity {
            consumer,
            credential: Some(format!(
                "oauth2:{}:{}",
                client.unwrap_or("-"),
                subject.unwrap_or("-")
            )),
            scopes,
            claims: Some(answer.claims.clone()),
            authenticated: true,
            ..Identity::default()
        }))
    }

    /// Checks an active answer's time window, issuer and audience at `now` (Unix seconds).
    fn check_claims(&self, claims: &Map<String, Value>, now: u64) -> Result<(), &'static str> {
        let leeway = self.config.leeway.as_secs();
        let number = |name: &str| claims.get(name).and_then(Value::as_u64);
        if let Some(exp) = number("exp")
            && now > exp.saturating_add(leeway)
        {
            return Err("it has expired");
        }
        if let Some(nbf) = number("nbf")
            && now.saturating_add(leeway) < nbf
        {
            return Err("it is not valid yet");
        }
        if let Some(iss) = &self.config.issuer
            && claims.get("iss").and_then(Value::as_str) != Some(iss.as_str())
        {
            return Err("it is from another issuer");
        }
        if !self.config.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.config.audiences.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.config.audiences.iter().any(|w| w == a)),
                _ => false,
            };
            if !ok {
                return Err("it is not meant for this audience");
            }
        }
        Ok(())
    }

    /// The answer for `token`: cached, awaited from a call in flight, or from a new call.
    async fn lookup(&self, token: &str) -> Result<Arc<Answer>, GatewayError> {
        let key: TokenKey = Sha256::digest(token.as_bytes()).into();
        let pending = {
            let mut st = self.inner.state();
            let now = Instant::now();
            match st.answers.get(&key) {
                Some(c) if c.until > now => return Ok(c.answer.clone()),
                Some(_) => {
                    st.answers.remove(&key);
                }
                None => {}
            }
            match st.in_flight.get(&key) {
                Some(p) => p.clone(),
                None => {
                    if st.backoff_until.is_some_and(|t| now < t)
                        || st.in_flight.len() >= self.inner.max_calls
                    {
                        return Err(unavailable());
                    }
                    start_call(&self.inner, &mut st, key, token)
                }
            }
        };
        pending.await.map_err(|_| unavailable())
    }

    /// Answers cached now (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.inner.state().answers.len()
    }
}

fn unavailable() -> GatewayError {
    GatewayError::new(
        ErrorKind::AuthUnavailable,
        "the token introspection endpoint cannot be reached now; retry later",
    )
}

/// Starts the call for `key` as its own task and registers it as in flight.
fn start_call(inner: &Arc<Inner>, st: &mut State, key: TokenKey, token: &str) -> Pending {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("token", token);
    if !inner.token_type_hint.is_empty() {
        form.append_pair("token_type_hint", &inner.token_type_hint);
    }
    let form = form.finish();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return async { Err("no runtime".to_owned()) }.boxed().shared();
    };
    let task_inner = Arc::clone(inner);
    let task = runtime.spawn(async move { call_and_store(task_inner, key, form).await });
    let pending = async move {
        task.await
            .unwrap_or_else(|e| Err(format!("introspection task failed: {e}")))
    }
    .boxed()
    .shared();
    st.in_flight.insert(key, pending.clone());
    pending
}

/// Clears the in-flight marker of a call even if its task dies early, so the next request
/// can start another call rather than wait on this one forever.
struct InFlightGuard<'a> {
    inner: &'a Inner,
    key: TokenKey,
    armed: bool,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.state().in_flight.remove(&self.key);
        }
    }
}

async fn call_and_store(
    inner: Arc<Inner>,
    key: TokenKey,
    form: String,
) -> Result<Arc<Answer>, String> {
    let mut guard = InFlightGuard {
        inner: &inner,
        key,
        armed: true,
    };
    let result = inner
        .fetcher
        .post_form(&inner.endpoint, &inner.client_auth, form)
        .await
        .and_then(|body| parse_answer(&body));
    let now = Instant::now();
    let mut st = inner.state();
    st.in_flight.remove(&key);
    guard.armed = false;
    match result {
        Ok(answer) => {
            st.backoff_until = None;
            let answer = Arc::new(answer);
            let ttl = answer_ttl(&answer, inner.cache_ttl, inner.negative_ttl, unix_now());
            if !ttl.is_zero() {
                if st.answers.len() >= inner.max_entries {
                    st.answers.retain(|_, c| c.until > now);
                }
                if st.answers.len() >= inner.max_entries {
                    // Still full of live answers: make room for a batch, so a churn of new
                    // tokens does not pay for a full scan on every insert.
                    let batch = (inner.max_entries / 16).max(1);
                    let victims: Vec<TokenKey> = st.answers.keys().take(batch).copied().collect();
                    for v in victims {
                        st.answers.remove(&v);
                    }
                }
                st.answers.insert(
                    key,
                    Cached {
                        answer: answer.clone(),
                        until: now + ttl,
                    },
                );
            }
            Ok(answer)
        }
        Err(e) => {
            st.backoff_until = Some(now + inner.failure_backoff);
            drop(st);
            tracing::warn!(endpoint = %inner.endpoint, error = %e, "token introspection failed");
            Err(e)
        }
    }
}

/// How long an answer may be reused: an active one until its `exp` (at most `ttl`), an
/// inactive one for `negative_ttl`.
fn answer_ttl(answer: &Answer, ttl: Duration, negative_ttl: Duration, now: u64) -> Duration {
    if !answer.active {
        return negative_ttl;
    }
    match answer.claims.get("exp").and_then(Value::as_u64) {
        // Past its `exp` the token is refused on every use; remember that briefly.
        Some(exp) if exp <= now => negative_ttl,
        Some(exp) => ttl.min(Duration::from_secs(exp - now)),
        None => ttl,
    }
}

/// Parses an introspection response: a JSON object whose `active` is a boolean.
fn parse_answer(body: &str) -> Result<Answer, String> {
    let claims: Map<String, Value> =
        serde_json::from_str(body).map_err(|e| format!("the answer is not a JSON object: {e}"))?;
    let active = claims
        .get("active")
        .and_then(Value::as_bool)
        .ok_or("the answer has no boolean `active`")?;
    Ok(Answer { active, claims })
}

/// `Authorization: Basic` for the gateway's client credentials; RFC 6749 §2.3.1 has both
/// parts form-encoded before they are joined.
fn basic_client_auth(id: &str, secret: &str) -> Option<HeaderValue> {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let joined = format!("{}:{}", enc(id), enc(secret));
    let value = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(joined)
    );
    let mut v = HeaderValue::from_str(&value).ok()?;
    v.set_sensitive(true);
    Some(v)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(v: Value) -> Answer {
        parse_answer(&v.to_string()).unwrap()
    }

    fn policy(extra: Value) -> OAuth2IntrospectionConfig {
        let mut base = json!({
            "endpoint": "http://127.0.0.1:9/introspect",
            "client_id": "gw", "client_secret_env": "X",
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn answers_need_a_boolean_active() {
        assert!(parse_answer(r#"{"active": "true"}"#).is_err());
        assert!(parse_answer(r#"[true]"#).is_err());
        assert!(parse_answer(r#"{"scope": "a"}"#).is_err());
        assert!(!answer(json!({"active": false})).active);
    }

    #[test]
    fn ttl_stops_at_exp_and_inactive_answers_are_kept_briefly() {
        let (ttl, neg) = (Duration::from_secs(60), Duration::from_secs(5));
        let now = 1_000_000;
        let a = answer(json!({"active": true, "exp": now + 10}));
        assert_eq!(answer_ttl(&a, ttl, neg, now), Duration::from_secs(10));
        let a = answer(json!({"active": true, "exp": now + 1000}));
        assert_eq!(answer_ttl(&a, ttl, neg, now), ttl);
        let a = answer(json!({"active": true}));
        assert_eq!(answer_ttl(&a, ttl, neg, now), ttl);
        let a = answer(json!({"active": true, "exp": now - 1}));
        assert_eq!(answer_ttl(&a, ttl, neg, now), neg);
        let a = answer(json!({"active": false}));
        assert_eq!(answer_ttl(&a, ttl, neg, now), neg);
    }

    #[test]
    fn claims_are_checked_with_leeway() {
        let cfg = policy(json!({"issuer": "https://idp", "audiences": ["shop"], "leeway": "10s"}));
        // `new` needs the secret; the checks do not, so build the policy around a fake one.
        let p = Introspection {
            header: HeaderName::from_static("authorization"),
            inner: Arc::new(Inner {
                endpoint: Uri::from_static("http://127.0.0.1:9/"),
                client_auth: HeaderValue::from_static("Basic x"),
                token_type_hint: String::new(),
                fetcher: Fetcher::new(Duration::from_secs(1), 1024).unwrap(),
                cache_ttl: cfg.cache_ttl,
                negative_ttl: cfg.negative_cache_ttl,
                max_entries: 1,
                max_calls: 1,
                failure_backoff: cfg.failure_backoff,
                state: Mutex::new(State::default()),
            }),
            config: cfg,
        };
        let now = 1_000_000;
        let ok =
            json!({"active": true, "iss": "https://idp", "aud": ["x", "shop"], "exp": now - 5});
        assert_eq!(p.check_claims(ok.as_object().unwrap(), now), Ok(()));
        let late = json!({"active": true, "iss": "https://idp", "aud": "shop", "exp": now - 11});
        assert!(p.check_claims(late.as_object().unwrap(), now).is_err());
        let early = json!({"active": true, "iss": "https://idp", "aud": "shop", "nbf": now + 11});
        assert!(p.check_claims(early.as_object().unwrap(), now).is_err());
        let other = json!({"active": true, "iss": "https://evil", "aud": "shop"});
        assert!(p.check_claims(other.as_object().unwrap(), now).is_err());
        let aud = json!({"active": true, "iss": "https://idp", "aud": ["web"]});
        assert!(p.check_claims(aud.as_object().unwrap(), now).is_err());
        let none = json!({"active": true, "iss": "https://idp"});
        assert!(p.check_claims(none.as_object().unwrap(), now).is_err());
    }

    #[test]
    fn client_credentials_are_form_encoded_before_base64() {
        let v = basic_client_auth("gw id", "s:e&cret").unwrap();
        let b64 = v.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(decoded, b"gw+id:s%3Ae%26cret");
        assert!(v.is_sensitive());
    }
}
