//! The endpoint table: the one list both the router and the OpenAPI document are built from,
//! so the document cannot describe a route that does not exist nor miss one that does.

use std::sync::LazyLock;

use http::Method;
use turnpike_model::mgmt::{Kind, Lifecycle, SubscriptionState};

/// The Admin API's path prefix.
pub const PREFIX: &str = "/admin/v1";

/// What an endpoint does; `http::dispatch` maps each to its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// List a kind's collection.
    List(Kind),
    /// Create an object from its spec.
    Create(Kind),
    /// Read one object.
    Get(Kind),
    /// Replace an object's spec (PUT).
    Replace(Kind),
    /// Merge-patch an object's spec.
    Patch(Kind),
    /// Delete an object.
    Delete(Kind),
    /// Decide on a subscription.
    Decide(SubscriptionState),
    /// Subscriptions of any team to this team's services.
    SubscriptionRequests,
    /// Move a service through its lifecycle.
    Transition(Lifecycle),
    /// A service's releases.
    ListReleases,
    /// One release of a service.
    GetRelease,
    /// Re-release an earlier release's content.
    Rollback,
    /// Blue/green: release the service again with another upstream.
    SwitchUpstream,
    /// Create routes from an OpenAPI document.
    ImportOpenapi,
    /// Create an admin token.
    CreateToken,
    /// List a user's tokens.
    ListTokens,
    /// Revoke a token.
    RevokeToken,
    /// The caller.
    Me,
    /// The audit log.
    Audit,
    /// Public services of every team.
    Catalog,
    /// This API's OpenAPI document.
    OpenApi,
    /// A kind's spec schema.
    Schema,
    /// The policy types.
    PolicyTypes,
    /// A policy type's config schema.
    PolicySchema,
    /// An application's plan quota usage.
    ApplicationUsage,
    /// Search the call logs.
    CallLogs,
    /// One call log, by request id.
    CallLog,
    /// Analytics time series.
    AnalyticsTimeseries,
    /// Analytics top-N.
    AnalyticsTop,
    /// Alert transitions.
    AlertHistory,
    /// Purge the response cache.
    CachePurge,
}

/// The request body an endpoint takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BodySpec {
    /// None; any body sent is ignored.
    None,
    /// JSON, described by the named component schema.
    Json {
        /// Component schema name.
        schema: String,
        /// Whether the body may be omitted.
        required: bool,
    },
    /// A JSON Merge Patch of a spec.
    MergePatch,
}

/// Which query parameters an endpoint understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuerySpec {
    /// None.
    None,
    /// `limit`, `cursor`, `state`, `name_prefix`.
    List,
    /// `limit`, `cursor`, `state` (listings filtered after reading).
    Filtered,
    /// `kind`, `team`, `object_id`, `limit`, `cursor`.
    Audit,
    /// `from`, `to`, `service`, `route`, `application`, `status`, `status_class`,
    /// `request_id`, `limit`, `cursor`.
    CallLogs,
    /// `metric`, `from`, `to`, `step`, `service`, `route`, `application`, `group_by`, `team`.
    Timeseries,
    /// `by`, `order`, `from`, `to`, `limit`, `service`, `route`, `application`, `team`.
    Top,
    /// `rule`, `from`, `to`, `limit`, `cursor`.
    AlertHistory,
}

/// One endpoint of the Admin API.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// HTTP method.
    pub method: Method,
    /// Path template in axum's (and OpenAPI's) `{param}` syntax.
    pub path: String,
    /// Unique OpenAPI operation id.
    pub operation_id: String,
    /// One-line summary.
    pub summary: String,
    /// Longer description, if any.
    pub description: Option<&'static str>,
    /// OpenAPI tag.
    pub tag: String,
    /// What it does.
    pub op: Op,
    /// Whether a bearer token is required.
    pub auth: bool,
    /// The request body.
    pub body: BodySpec,
    /// The query parameters.
    pub query: QuerySpec,
    /// Success status.
    pub status: u16,
    /// Component schema of the success response (`None`: no body).
    pub response: Option<String>,
    /// Error statuses this endpoint can answer with.
    pub errors: Vec<u16>,
}

/// PascalCase of a kind (`consumer_group` → `ConsumerGroup`), for schema names and ids.
pub(crate) fn pascal(kind: Kind) -> String {
    kind.as_str()
        .split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// The collection path of a kind (`/admin/v1/teams/{team}/routes`).
pub(crate) fn collection_path(kind: Kind) -> String {
    match kind {
        Kind::Team | Kind::User => format!("{PREFIX}/{}", kind.collection()),
        _ => format!("{PREFIX}/teams/{{team}}/{}", kind.collection()),
    }
}

/// The item path parameter of a kind.
pub(crate) fn item_param(kind: Kind) -> &'static str {
    match kind {
        Kind::Team => "team",
        Kind::User => "user",
        _ => "name",
    }
}

/// The item path of a kind (`/admin/v1/teams/{team}/routes/{name}`).
pub(crate) fn item_path(kind: Kind) -> String {
    match kind {
        Kind::Team | Kind::User => format!("{}/{{{}}}", collection_path(kind), item_param(kind)),
        _ => format!("{}/{{name}}", collection_path(kind)),
    }
}

const MERGE_PATCH_DOC: &str = "The body is a JSON Merge Patch (RFC 7396) of the spec, sent as \
    `application/merge-patch+json` or `application/json`: members set to `null` are removed, \
    objects merge recursively, anything else (arrays included) replaces the current value. The \
    result is validated like a PUT body. Server-managed fields (credential hashes, subscription \
    decisions) cannot be changed this way.";

const PUT_DOC: &str = "The body is the complete new spec. Its `name` may differ from the one \
    in the URL: that renames the object (refused with 409 while other objects refer to the old \
    name), and the response's `Location` header gives the new URL.";

/// Every endpoint, in a stable order.
pub(crate) static ENDPOINTS: LazyLock<Vec<Endpoint>> = LazyLock::new(build);

#[allow(clippy::too_many_lines)]
fn build() -> Vec<Endpoint> {
    let mut v = Vec::new();
    let mut add = |method: Method,
                   path: String,
                   id: String,
                   summary: String,
                   tag: &str,
                   op: Op,
                   body: BodySpec,
                   status: u16,
                   response: Option<String>| {
        let query = match op {
            Op::List(_) => QuerySpec::List,
            Op::SubscriptionRequests | Op::Catalog => QuerySpec::Filtered,
            Op::Audit => QuerySpec::Audit,
            Op::CallLogs => QuerySpec::CallLogs,
            Op::AnalyticsTimeseries => QuerySpec::Timeseries,
            Op::AnalyticsTop => QuerySpec::Top,
            Op::AlertHistory => QuerySpec::AlertHistory,
            _ => QuerySpec::None,
        };
        let description = match op {
            Op::Patch(_) => Some(MERGE_PATCH_DOC),
            Op::Replace(_) => Some(PUT_DOC),
            Op::Schema => Some(
                "The JSON Schema (2020-12) of a kind's spec. Requires authentication like \
                 every endpoint but the OpenAPI document.",
            ),
            Op::Rollback => Some(
                "Creates a new release whose content is that of an earlier one. The latest \
                 release is what the gateway serves; the service's working spec and routes \
                 are left as they are.",
            ),
            Op::SwitchUpstream => Some(
                "Blue/green in one call: releases the latest release's content again with the \
                 service's `upstream` replaced (routes naming their own upstream keep it), and \
                 sets the working spec's upstream too. Switching back is the same call.",
            ),
            Op::ImportOpenapi => Some(
                "Stores the OpenAPI 3.x document in the service's `openapi` field and creates \
                 or updates one route per path, named `<service>-<slug of path>`, matching the \
                 path as a template (prefixed by the first server URL's path) and the \
                 operations' methods. Importing the same document again changes nothing.",
            ),
            Op::ApplicationUsage => Some(
                "Per approved subscription of the application, each quota of its plan: the \
                 current period, the limit, the requests counted, what remains and when the \
                 period resets. Counts are those the gateway nodes have flushed to the \
                 store, so they lag by up to one quota flush interval.",
            ),
            Op::CallLogs => Some(
                "Calls the gateway nodes wrote to the store, newest first (time, then id). \
                 Super admins see every call; other users see the calls to their teams' \
                 services and those made by their teams' applications. `service` and \
                 `application` take a store id or `team/name`. Calls reach the store in \
                 batches, so the newest may lag by up to the call-log flush interval. A page \
                 does a bounded amount of work (`observability.call_log.search`): when the \
                 filters match few of many stored calls, it may hold fewer items than \
                 `limit`, or none, and still a `next_cursor`. The search is over when \
                 `next_cursor` is null.",
            ),
            Op::CallLog => Some(
                "The newest call with this request id that the caller may see (see \
                 `searchCallLogs` for who sees what). 422 `too_many_calls` when the id is on \
                 more stored calls than a lookup reads (a request id clients reuse): search \
                 with `request_id` instead.",
            ),
            Op::AnalyticsTimeseries => Some(
                "Points of one metric per step over `[from, to)` (aligned to the step), from \
                 the per-minute rollups every gateway node writes, downsampled to hours and \
                 days. One series, or one per value of `group_by`. Times are epoch \
                 milliseconds; latencies (p50, p95, p99) are milliseconds of total latency, \
                 within 1 % of the exact value; `error_rate` and latencies are null where a \
                 bucket has no requests. Super admins see every team's traffic; others pass \
                 `team` and see its services' and applications' traffic.",
            ),
            Op::AnalyticsTop => Some(
                "The busiest, most failing or slowest applications, routes or services over \
                 `[from, to)` (default: the last 24 hours). The range is read at minute \
                 resolution up to 6 hours, hours up to 62 days, days beyond, and aligned to \
                 it. Scoping as for the time series.",
            ),
            Op::CachePurge => Some(
                "Removes response-cache entries by URL (`key`: `scheme://host:port/path?query`, \
                 every method and variant), URL prefix, tag (the values of the upstream's \
                 `cache-tag` header), or `all`, from this node's memory and from the shared \
                 Redis tier; nodes sharing that Redis clear their memory when the purge is \
                 published. Super admins only: the cache serves every team.",
            ),
            Op::AlertHistory => Some(
                "Alert transitions (firing, resolved), newest first, with the measured value \
                 and whether a notification was sent (not within a rule's cooldown). Super \
                 admins only: alert rules are gateway configuration.",
            ),
            _ => None,
        };
        let auth = !matches!(op, Op::OpenApi);
        let errors = errors_for(op, &path, &body);
        v.push(Endpoint {
            method,
            path,
            operation_id: id,
            summary,
            description,
            tag: tag.to_owned(),
            op,
            auth,
            body,
            query,
            status,
            response,
            errors,
        });
    };
    let json = |schema: &str, required: bool| BodySpec::Json {
        schema: schema.to_owned(),
        required,
    };

    for kind in Kind::ALL {
        let p = pascal(kind);
        let coll = collection_path(kind);
        let item = item_path(kind);
        let tag = kind.collection().to_owned();
        let what = kind.as_str().replace('_', " ");
        let spec = format!("{p}Spec");
        let object = Some(format!("{p}Object"));
        add(
            Method::GET,
            coll.clone(),
            format!("list{p}"),
            format!("List {what} objects"),
            &tag,
            Op::List(kind),
            BodySpec::None,
            200,
            Some(format!("{p}Page")),
        );
        add(
            Method::POST,
            coll,
            format!("create{p}"),
            format!("Create a {what}"),
            &tag,
            Op::Create(kind),
            json(&spec, true),
            201,
            object.clone(),
        );
        add(
            Method::GET,
            item.clone(),
            format!("get{p}"),
            format!("Read a {what}"),
            &tag,
            Op::Get(kind),
            BodySpec::None,
            200,
            object.clone(),
        );
        add(
            Method::PUT,
            item.clone(),
            format!("replace{p}"),
            format!("Replace a {what}'s spec"),
            &tag,
            Op::Replace(kind),
            json(&spec, true),
            200,
            object.clone(),
        );
        add(
            Method::PATCH,
            item.clone(),
            format!("patch{p}"),
            format!("Merge-patch a {what}'s spec"),
            &tag,
            Op::Patch(kind),
            BodySpec::MergePatch,
            200,
            object,
        );
        add(
            Method::DELETE,
            item,
            format!("delete{p}"),
            format!("Delete a {what}"),
            &tag,
            Op::Delete(kind),
            BodySpec::None,
            204,
            None,
        );
    }

    let sub = format!("{}/{{name}}", collection_path(Kind::Subscription));
    for (verb, state) in [
        ("approve", SubscriptionState::Approved),
        ("reject", SubscriptionState::Rejected),
        ("revoke", SubscriptionState::Revoked),
    ] {
        add(
            Method::POST,
            format!("{sub}/{verb}"),
            format!("{verb}Subscription"),
            format!(
                "{}{} a subscription (the service's API owners)",
                &verb[..1].to_uppercase(),
                &verb[1..]
            ),
            "subscriptions",
            Op::Decide(state),
            json("DecisionRequest", false),
            200,
            Some("SubscriptionObject".into()),
        );
    }
    add(
        Method::GET,
        format!("{PREFIX}/teams/{{team}}/subscription-requests"),
        "listSubscriptionRequests".into(),
        "Subscriptions of any team to this team's services".into(),
        "subscriptions",
        Op::SubscriptionRequests,
        BodySpec::None,
        200,
        Some("SubscriptionPage".into()),
    );

    let svc = format!("{}/{{name}}", collection_path(Kind::Service));
    for (verb, to, body) in [
        (
            "publish",
            Lifecycle::Published,
            json("PublishRequest", false),
        ),
        ("deprecate", Lifecycle::Deprecated, BodySpec::None),
        ("retire", Lifecycle::Retired, BodySpec::None),
    ] {
        add(
            Method::POST,
            format!("{svc}/{verb}"),
            format!("{verb}Service"),
            format!("{}{} a service", &verb[..1].to_uppercase(), &verb[1..]),
            "services",
            Op::Transition(to),
            body,
            200,
            Some("LifecycleResult".into()),
        );
    }
    add(
        Method::GET,
        format!("{svc}/releases"),
        "listServiceReleases".into(),
        "A service's releases, oldest first".into(),
        "services",
        Op::ListReleases,
        BodySpec::None,
        200,
        Some("ReleasePage".into()),
    );
    add(
        Method::GET,
        format!("{svc}/releases/{{number}}"),
        "getServiceRelease".into(),
        "One release of a service".into(),
        "services",
        Op::GetRelease,
        BodySpec::None,
        200,
        Some("Release".into()),
    );
    add(
        Method::POST,
        format!("{svc}/rollback"),
        "rollbackService".into(),
        "Release an earlier release's content again".into(),
        "services",
        Op::Rollback,
        json("RollbackRequest", true),
        200,
        Some("LifecycleResult".into()),
    );
    add(
        Method::POST,
        format!("{svc}/switch"),
        "switchServiceUpstream".into(),
        "Blue/green: release the service again with another upstream".into(),
        "services",
        Op::SwitchUpstream,
        json("SwitchRequest", true),
        200,
        Some("LifecycleResult".into()),
    );
    add(
        Method::POST,
        format!("{svc}/import-openapi"),
        "importServiceOpenapi".into(),
        "Create a service's routes from an OpenAPI 3 document".into(),
        "services",
        Op::ImportOpenapi,
        json("OpenApiDocument", true),
        200,
        Some("ImportResult".into()),
    );

    add(
        Method::GET,
        format!("{}/{{name}}/usage", collection_path(Kind::Application)),
        "getApplicationUsage".into(),
        "An application's plan quota usage in the current periods".into(),
        "applications",
        Op::ApplicationUsage,
        BodySpec::None,
        200,
        Some("ApplicationUsage".into()),
    );

    add(
        Method::GET,
        format!("{PREFIX}/call-logs"),
        "searchCallLogs".into(),
        "Search the call logs, newest first".into(),
        "call-logs",
        Op::CallLogs,
        BodySpec::None,
        200,
        Some("CallLogPage".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/call-logs/{{request_id}}"),
        "getCallLog".into(),
        "One call, by request id".into(),
        "call-logs",
        Op::CallLog,
        BodySpec::None,
        200,
        Some("CallLog".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/analytics/timeseries"),
        "getAnalyticsTimeseries".into(),
        "A time series of requests, errors, latency or bytes, shaped for charts".into(),
        "analytics",
        Op::AnalyticsTimeseries,
        BodySpec::None,
        200,
        Some("AnalyticsTimeseries".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/analytics/top"),
        "getAnalyticsTop".into(),
        "Top applications, routes or services by requests, errors or p99 latency".into(),
        "analytics",
        Op::AnalyticsTop,
        BodySpec::None,
        200,
        Some("AnalyticsTop".into()),
    );
    add(
        Method::POST,
        format!("{PREFIX}/cache/purge"),
        "purgeCache".into(),
        "Purge response-cache entries by URL, prefix or tag, on every node".into(),
        "cache",
        Op::CachePurge,
        json("CachePurgeRequest", true),
        200,
        Some("CachePurgeReport".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/alerts/history"),
        "listAlertHistory".into(),
        "Alert transitions, newest first".into(),
        "analytics",
        Op::AlertHistory,
        BodySpec::None,
        200,
        Some("AlertHistoryPage".into()),
    );

    let tokens = format!("{PREFIX}/users/{{user}}/tokens");
    add(
        Method::POST,
        tokens.clone(),
        "createToken".into(),
        "Create an admin token (the user or a super admin)".into(),
        "tokens",
        Op::CreateToken,
        json("TokenRequest", true),
        201,
        Some("TokenCreated".into()),
    );
    add(
        Method::GET,
        tokens.clone(),
        "listTokens".into(),
        "A user's admin tokens, revoked and expired ones included".into(),
        "tokens",
        Op::ListTokens,
        BodySpec::None,
        200,
        Some("TokenPage".into()),
    );
    add(
        Method::DELETE,
        format!("{tokens}/{{id}}"),
        "revokeToken".into(),
        "Revoke an admin token".into(),
        "tokens",
        Op::RevokeToken,
        BodySpec::None,
        204,
        None,
    );
    add(
        Method::GET,
        format!("{PREFIX}/me"),
        "getMe".into(),
        "The caller: user, super admin flag and team roles".into(),
        "me",
        Op::Me,
        BodySpec::None,
        200,
        Some("Me".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/audit"),
        "listAudit".into(),
        "The audit log, newest first".into(),
        "audit",
        Op::Audit,
        BodySpec::None,
        200,
        Some("AuditPage".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/catalog"),
        "listCatalog".into(),
        "Public published or deprecated services of every team".into(),
        "catalog",
        Op::Catalog,
        BodySpec::None,
        200,
        Some("ServicePage".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/schemas/{{kind}}"),
        "getSchema".into(),
        "The JSON Schema of a kind's spec".into(),
        "schemas",
        Op::Schema,
        BodySpec::None,
        200,
        Some("JsonSchema".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/schemas/policies"),
        "listPolicyTypes".into(),
        "The policy types, with the stage each runs in".into(),
        "schemas",
        Op::PolicyTypes,
        BodySpec::None,
        200,
        Some("PolicyTypeList".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/schemas/policies/{{policy_type}}"),
        "getPolicySchema".into(),
        "The JSON Schema of a policy type's `config`".into(),
        "schemas",
        Op::PolicySchema,
        BodySpec::None,
        200,
        Some("JsonSchema".into()),
    );
    add(
        Method::GET,
        format!("{PREFIX}/openapi.json"),
        "getOpenapi".into(),
        "This OpenAPI document".into(),
        "schemas",
        Op::OpenApi,
        BodySpec::None,
        200,
        Some("OpenApiDocument".into()),
    );
    v
}

/// The error statuses an endpoint can produce, derived from what it does.
fn errors_for(op: Op, path: &str, body: &BodySpec) -> Vec<u16> {
    if op == Op::OpenApi {
        return Vec::new();
    }
    let mut e = vec![401, 503];
    if path.contains('{') || matches!(op, Op::Audit | Op::AnalyticsTimeseries | Op::AnalyticsTop) {
        e.push(404);
    }
    let reads_team_scoped = matches!(
        op,
        Op::List(k) | Op::Get(k) if k.team_scoped() || k == Kind::Team
    ) || matches!(
        op,
        Op::SubscriptionRequests
            | Op::ListReleases
            | Op::GetRelease
            | Op::Catalog
            | Op::Me
            | Op::Schema
            | Op::PolicyTypes
            | Op::PolicySchema
            | Op::ApplicationUsage
            | Op::CallLogs
            | Op::CallLog
    );
    if !reads_team_scoped {
        e.push(403);
    }
    if !matches!(body, BodySpec::None) {
        e.extend([400, 413, 415]);
    }
    if matches!(
        op,
        Op::Create(_)
            | Op::Replace(_)
            | Op::Patch(_)
            | Op::Delete(_)
            | Op::Decide(_)
            | Op::Transition(_)
            | Op::Rollback
            | Op::SwitchUpstream
            | Op::ImportOpenapi
    ) {
        e.push(409);
    }
    if matches!(op, Op::Replace(_) | Op::Patch(_) | Op::Delete(_)) {
        e.push(412);
    }
    if !matches!(body, BodySpec::None)
        || matches!(
            op,
            Op::List(_)
                | Op::SubscriptionRequests
                | Op::Catalog
                | Op::Audit
                | Op::CallLogs
                | Op::CallLog
                | Op::AnalyticsTimeseries
                | Op::AnalyticsTop
                | Op::AlertHistory
        )
    {
        e.push(422);
    }
    e.sort_unstable();
    e.dedup();
    e
}
