//! `POST /admin/v1/cache/purge`: removes response-cache entries through the gateway running
//! in this process.

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::PurgeTarget;
use crate::error::{AdminError, AdminResult};
use crate::http::Ctx;

/// Purges by exactly one of `key`, `prefix`, `tag` or `all: true`.
pub(crate) async fn purge(ctx: &Ctx) -> AdminResult<Response> {
    let caller = ctx.caller()?;
    if !caller.super_admin {
        return Err(AdminError::forbidden(
            "the response cache serves every team: only super admins purge it",
        ));
    }
    let body = ctx.body()?;
    let target = target(&body)?;
    let Some(purger) = ctx.state.cache_purger() else {
        return Err(AdminError::cache_unavailable(
            "no gateway runs in this process, so there is no response cache to purge here",
        ));
    };
    let report = purger.purge(target).await;
    Ok(axum::Json(json!({ "purged": report })).into_response())
}

fn target(body: &Value) -> AdminResult<PurgeTarget> {
    let Some(fields) = body.as_object() else {
        return Err(AdminError::validation("", "the body must be a JSON object"));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "key" | "prefix" | "tag" | "all"))
    {
        return Err(AdminError::validation(
            unknown.clone(),
            format!("unknown field `{unknown}`; give one of `key`, `prefix`, `tag`, `all`"),
        ));
    }
    if fields.len() != 1 {
        return Err(AdminError::validation(
            "",
            "give exactly one of `key`, `prefix`, `tag`, `all`",
        ));
    }
    let (name, value) = fields.iter().next().ok_or_else(|| {
        AdminError::validation("", "give exactly one of `key`, `prefix`, `tag`, `all`")
    })?;
    if name == "all" {
        return match value {
            Value::Bool(true) => Ok(PurgeTarget::All),
            _ => Err(AdminError::validation("all", "must be `true`")),
        };
    }
    let text = value
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AdminError::validation(name.clone(), "must be a non-empty string"))?
        .to_owned();
    Ok(match name.as_str() {
        "key" => PurgeTarget::Key(text),
        "prefix" => PurgeTarget::Prefix(text),
        _ => PurgeTarget::Tag(text),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn exactly_one_target() {
        assert_eq!(
            target(&json!({"tag": "t"})).unwrap(),
            PurgeTarget::Tag("t".into())
        );
        assert_eq!(target(&json!({"all": true})).unwrap(), PurgeTarget::All);
        assert!(target(&json!({"all": false})).is_err());
        assert!(target(&json!({"key": "a", "tag": "b"})).is_err());
        assert!(target(&json!({})).is_err());
        assert!(target(&json!({"prefix": ""})).is_err());
        assert!(target(&json!({"url": "x"})).is_err());
    }
}
