//! Authentication (bearer tokens) and authorisation (super admin flag, team roles).
//!
//! Team isolation: an object of a team the caller does not belong to answers 404, exactly
//! as if it did not exist, so neither names nor existence leak across teams. A member whose
//! role is too low for what it asks gets 403.

use std::collections::HashMap;

use http::{HeaderMap, header};
use turnpike_model::mgmt::{Kind, Role, check_name};
use turnpike_store::{ListQuery, MAX_LIMIT, Object, Store, TeamFilter, now_ms};

use crate::AdminState;
use crate::error::{AdminError, AdminResult};

/// Record a token's last use at most this often (ms): it is a write, and a busy client should
/// not turn every read into one.
const TOUCH_EVERY_MS: i64 = 60_000;

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The user object.
    pub user: Object,
    /// Whether the user is a super admin.
    pub super_admin: bool,
    /// Role per team id.
    pub roles: HashMap<String, Role>,
}

impl Caller {
    /// The user's name.
    pub fn name(&self) -> &str {
        &self.user.name
    }

    /// The actor written to the audit log: the user's id, which survives renames.
    pub fn actor(&self) -> &str {
        &self.user.id
    }

    /// The role in a team (`None`: not a member). Super admins are not members by default.
    pub fn role_in(&self, team_id: &str) -> Option<Role> {
        self.roles.get(team_id).copied()
    }

    /// Whether the caller may act in `team_id` with at least `min`.
    pub fn has(&self, team_id: &str, min: Role) -> bool {
        self.super_admin || self.role_in(team_id).is_some_and(|r| r >= min)
    }

    /// Whether the caller can see `team_id` at all.
    pub fn sees(&self, team_id: &str) -> bool {
        self.super_admin || self.role_in(team_id).is_some()
    }

    /// 403 unless a super admin.
    pub fn require_super(&self) -> AdminResult<()> {
        if self.super_admin {
            Ok(())
        } else {
            Err(AdminError::forbidden("only a super admin may do this"))
        }
    }
}

/// Resolves the bearer token of a request to its user and the user's memberships.
pub(crate) async fn authenticate(state: &AdminState, headers: &HeaderMap) -> AdminResult<Caller> {
    let store = state.store();
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            AdminError::unauthorized("send an admin token as `Authorization: Bearer <token>`")
        })?;
    let token = store
        .lookup_token(secret)
        .await?
        .ok_or_else(|| AdminError::unauthorized("the token is unknown, expired or revoked"))?;
    let user = store
        .get(Kind::User.as_str(), &token.user_id)
        .await?
        .ok_or_else(|| AdminError::unauthorized("the token's user no longer exists"))?;
    let flag = |name: &str| user.spec.get(name).and_then(serde_json::Value::as_bool) == Some(true);
    if flag("disabled") {
        return Err(AdminError::unauthorized("the user is disabled"));
    }
    let now = now_ms();
    if token
        .last_used_at
        .is_none_or(|at| now - at >= TOUCH_EVERY_MS)
    {
        // Bookkeeping only: a failure here must not fail the request.
        if let Err(e) = store.touch_token(&token.id, now).await {
            tracing::debug!(error = %e, "could not record the token's last use");
        }
    }
    let roles = memberships(store, &user.name).await?;
    Ok(Caller {
        super_admin: flag("super_admin"),
        user,
        roles,
    })
}

/// The roles of the user named `user_name`, by team id: member objects are named after the
/// user they make a member.
pub(crate) async fn memberships(
    store: &Store,
    user_name: &str,
) -> AdminResult<HashMap<String, Role>> {
    let mut roles = HashMap::new();
    let mut query = ListQuery {
        team: TeamFilter::Any,
        name_prefix: Some(user_name.to_owned()),
        limit: Some(MAX_LIMIT),
        ..ListQuery::default()
    };
    loop {
        let page = store.list(Kind::Member.as_str(), &query).await?;
        for member in page.items.iter().filter(|m| m.name == user_name) {
            let role = member
                .spec
                .get("role")
                .cloned()
                .and_then(|r| serde_json::from_value::<Role>(r).ok());
            if let (Some(team), Some(role)) = (&member.team_id, role) {
                roles.insert(team.clone(), role);
            }
        }
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    Ok(roles)
}

/// The team named `name` if the caller can see it, else 404; 403 if it can but its role is
/// below `min`.
pub(crate) async fn team_access(
    store: &Store,
    caller: &Caller,
    name: &str,
    min: Role,
) -> AdminResult<Object> {
    let team = find_team(store, name)
        .await?
        .filter(|team| caller.sees(&team.id))
        .ok_or_else(|| team_not_found(name))?;
    if !caller.has(&team.id, min) {
        return Err(AdminError::forbidden(format!(
            "this needs the {} role in team {name}",
            role_name(min)
        )));
    }
    Ok(team)
}

/// The team named `name`, whoever asks.
pub(crate) async fn find_team(store: &Store, name: &str) -> AdminResult<Option<Object>> {
    if check_name(name).is_err() {
        return Ok(None);
    }
    Ok(store.get_by_name(Kind::Team.as_str(), None, name).await?)
}

/// The 404 for a team that does not exist or that the caller cannot see.
pub(crate) fn team_not_found(name: &str) -> AdminError {
    AdminError::not_found(format!("no team named {name:?}"))
}

/// The lowest role that may write objects of `kind` in a team.
pub(crate) fn write_role(kind: Kind) -> Role {
    match kind {
        Kind::Member | Kind::Team => Role::TeamAdmin,
        Kind::Application | Kind::Credential | Kind::ConsumerGroup | Kind::Subscription => {
            Role::ConsumerDeveloper
        }
        _ => Role::ApiOwner,
    }
}

/// A role as spelled in specs.
pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::ConsumerDeveloper => "consumer_developer",
        Role::ApiOwner => "api_owner",
        Role::TeamAdmin => "team_admin",
        Role::SuperAdmin => "super_admin",
    }
}
