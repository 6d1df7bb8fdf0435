//! The store's behaviour, run against both backends: every test below exists as
//! `sqlite::<name>` and `postgres::<name>`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::TestDb;
use serde_json::json;
use tokio::time::timeout;
use turnpike_store::{
    AuditQuery, AuditRecord, Backend, ListQuery, MAX_LIMIT, NewObject, ObjectPatch, Store,
    StoreError, TOKEN_KIND, TeamFilter, now_ms,
};

both_backends!(
    crud,
    duplicates,
    revision_conflicts,
    pagination_visits_every_item_once,
    filters,
    audit_is_transactional,
    version_bumps_once_per_committed_change,
    releases_are_numbered_without_gaps,
    tokens,
    watch_sees_local_commit_at_once,
    watch_sees_other_store_commit,
    load_all_is_consistent,
    invalid_input,
    reopen_keeps_everything,
    writers_wait_then_give_up,
);

fn new(kind: &str, team: Option<&str>, name: &str) -> NewObject {
    NewObject {
        kind: kind.into(),
        team_id: team.map(Into::into),
        name: name.into(),
        spec: json!({ "name": name }),
        ..NewObject::default()
    }
}

/// Creates the objects in one committed transaction.
async fn seed(store: &Store, objects: Vec<NewObject>) -> Vec<turnpike_store::Object> {
    let mut tx = store.begin("seed").await.unwrap();
    let mut created = Vec::new();
    for object in objects {
        created.push(tx.create(object).await.unwrap());
    }
    tx.commit().await.unwrap();
    created
}

async fn crud(db: &TestDb) {
    let store = &db.store;
    let mut tx = store.begin("alice").await.unwrap();
    let created = tx
        .create(NewObject {
            state: Some("draft".into()),
            spec: json!({ "url": "http://orders:8080", "retries": 2 }),
            ..new("service", Some("team-a"), "orders")
        })
        .await
        .unwrap();
    // Reads inside the transaction see its own writes.
    assert_eq!(
        tx.get("service", &created.id).await.unwrap().as_ref(),
        Some(&created)
    );
    tx.commit().await.unwrap();

    assert_eq!(created.revision, 1);
    assert_eq!(created.team_id.as_deref(), Some("team-a"));
    assert_eq!(created.state.as_deref(), Some("draft"));
    assert_eq!(created.created_by.as_deref(), Some("alice"));
    assert_eq!(created.created_at, created.updated_at);
    assert_eq!(
        created.spec,
        json!({ "url": "http://orders:8080", "retries": 2 })
    );
    assert!(uuid::Uuid::parse_str(&created.id).is_ok_and(|u| u.get_version_num() == 7));

    let got = store.get("service", &created.id).await.unwrap();
    assert_eq!(got.as_ref(), Some(&created));
    let by_name = store
        .get_by_name("service", Some("team-a"), "orders")
        .await
        .unwrap();
    assert_eq!(by_name.as_ref(), Some(&created));
    assert_eq!(
        store.get_by_name("service", None, "orders").await.unwrap(),
        None
    );
    assert_eq!(store.get("route", &created.id).await.unwrap(), None);

    let mut tx = store.begin("bob").await.unwrap();
    let patch = ObjectPatch {
        state: Some(Some("published".into())),
        spec: Some(json!({ "url": "http://orders:9090" })),
        ..ObjectPatch::default()
    };
    let updated = tx
        .update("service", &created.id, Some(1), patch)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.name, "orders");
    assert_eq!(updated.state.as_deref(), Some("published"));
    assert_eq!(updated.spec, json!({ "url": "http://orders:9090" }));
    assert_eq!(updated.created_by.as_deref(), Some("alice"));
    assert_eq!(updated.updated_by.as_deref(), Some("bob"));
    assert_eq!(
        store.get("service", &created.id).await.unwrap(),
        Some(updated.clone())
    );

    // Rename, and clear the state.
    let mut tx = store.begin("bob").await.unwrap();
    let patch = ObjectPatch {
        name: Some("orders-v2".into()),
        state: Some(None),
        ..ObjectPatch::default()
    };
    let renamed = tx
        .update("service", &created.id, None, patch)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!((renamed.revision, renamed.state.as_deref()), (3, None));
    assert_eq!(renamed.spec, updated.spec);
    assert!(
        store
            .get_by_name("service", Some("team-a"), "orders")
            .await
            .unwrap()
            .is_none()
    );

    let mut tx = store.begin("bob").await.unwrap();
    let deleted = tx.delete("service", &created.id, Some(3)).await.unwrap();
    assert_eq!(deleted, renamed);
    assert!(matches!(
        tx.delete("service", &created.id, None).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        tx.update("service", &created.id, None, ObjectPatch::default())
            .await,
        Err(StoreError::NotFound { .. })
    ));
    tx.commit().await.unwrap();
    assert_eq!(store.get("service", &created.id).await.unwrap(), None);

    // Caller-chosen ids (declarative config) are kept as given.
    let chosen = seed(
        store,
        vec![NewObject {
            id: Some("svc-orders".into()),
            ..new("service", None, "o")
        }],
    )
    .await;
    assert_eq!(chosen[0].id, "svc-orders");
    assert_eq!(chosen[0].team_id, None);
}

async fn duplicates(db: &TestDb) {
    let store = &db.store;
    seed(
        store,
        vec![new("plan", None, "gold"), new("plan", Some("t1"), "gold")],
    )
    .await;

    let mut tx = store.begin("alice").await.unwrap();
    // No team: NULL must still collide.
    let err = tx.create(new("plan", None, "gold")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Duplicate { kind, name } if kind == "plan" && name == "gold"),
        "{err}"
    );
    assert!(matches!(
        tx.create(new("plan", Some("t1"), "gold")).await,
        Err(StoreError::Duplicate { .. })
    ));
    // The transaction is still usable after a Duplicate, on both backends.
    tx.create(new("plan", Some("t2"), "gold")).await.unwrap();
    tx.create(new("consumer_group", None, "gold"))
        .await
        .unwrap();
    let silver = tx.create(new("plan", None, "silver")).await.unwrap();
    let err = tx
        .update(
            "plan",
            &silver.id,
            None,
            ObjectPatch {
                name: Some("gold".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Duplicate { .. }), "{err}");
    let err = tx
        .create(NewObject {
            id: Some(silver.id.clone()),
            ..new("plan", None, "bronze")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateId { .. }), "{err}");
    tx.commit().await.unwrap();

    let all = store.list_all("plan").await.unwrap();
    assert_eq!(all.len(), 4);
}

async fn revision_conflicts(db: &TestDb) {
    let store = &db.store;
    let plan = seed(store, vec![new("plan", None, "gold")]).await.remove(0);

    let mut tx = store.begin("alice").await.unwrap();
    let patch = ObjectPatch {
        spec: Some(json!({ "rate": 10 })),
        ..Default::default()
    };
    tx.update("plan", &plan.id, Some(1), patch.clone())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // A second writer still holding revision 1 loses.
    let mut tx = store.begin("bob").await.unwrap();
    let err = tx
        .update("plan", &plan.id, Some(1), patch)
        .await
        .unwrap_err();
    match err {
        StoreError::Conflict {
            expected, actual, ..
        } => assert_eq!((expected, actual), (1, 2)),
        other => panic!("expected a conflict, got {other}"),
    }
    let err = tx.delete("plan", &plan.id, Some(7)).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 7,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    tx.commit().await.unwrap();

    let now = store.get("plan", &plan.id).await.unwrap().unwrap();
    assert_eq!((now.revision, now.spec), (2, json!({ "rate": 10 })));

    let mut tx = store.begin("bob").await.unwrap();
    tx.delete("plan", &plan.id, Some(2)).await.unwrap();
    tx.commit().await.unwrap();
    assert!(store.get("plan", &plan.id).await.unwrap().is_none());
}

async fn pagination_visits_every_item_once(db: &TestDb) {
    let store = &db.store;
    let created = seed(
        store,
        (0..120)
            .map(|i| new("route", None, &format!("r{i:03}")))
            .collect(),
    )
    .await;
    seed(store, vec![new("service", None, "not-a-route")]).await;

    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = Vec::new();
    loop {
        let query = ListQuery {
            limit: Some(50),
            cursor: cursor.clone(),
            ..Default::default()
        };
        let page = store.list("route", &query).await.unwrap();
        pages.push(page.items.len());
        seen.extend(page.items.into_iter().map(|o| o.id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, [50, 50, 20]);
    let mut expected: Vec<String> = created.into_iter().map(|o| o.id).collect();
    expected.sort();
    assert_eq!(seen, expected, "every item exactly once, in id order");

    let one = store
        .list(
            "route",
            &ListQuery {
                limit: Some(0),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(one.unwrap().items.len(), 1);
    let default = store.list("route", &ListQuery::default()).await.unwrap();
    assert_eq!(default.items.len(), 50);

    // Huge limits are clamped.
    seed(
        store,
        (120..520)
            .map(|i| new("route", None, &format!("r{i:03}")))
            .collect(),
    )
    .await;
    let huge = ListQuery {
        limit: Some(100_000),
        ..Default::default()
    };
    let page = store.list("route", &huge).await.unwrap();
    assert_eq!(page.items.len(), usize::try_from(MAX_LIMIT).unwrap());
    assert!(page.next_cursor.is_some());
}

async fn filters(db: &TestDb) {
    let store = &db.store;
    let with_state = |team: Option<&str>, name: &str, state: &str| NewObject {
        state: Some(state.into()),
        ..new("subscription", team, name)
    };
    seed(
        store,
        vec![
            with_state(Some("a"), "alpha-1", "approved"),
            with_state(Some("a"), "alpha-2", "pending"),
            with_state(Some("b"), "alpha-3", "approved"),
            with_state(Some("b"), "Alpha-4", "approved"),
            with_state(None, "beta", "pending"),
            with_state(None, "al%pha", "pending"),
        ],
    )
    .await;
    let query = |team: TeamFilter, state: Option<&str>, prefix: Option<&str>| ListQuery {
        team,
        state: state.map(Into::into),
        name_prefix: prefix.map(Into::into),
        ..ListQuery::default()
    };
    let (any, a, b) = (
        TeamFilter::Any,
        TeamFilter::Team("a".into()),
        TeamFilter::Team("b".into()),
    );
    let cases: [(ListQuery, &[&str]); 9] = [
        (
            query(any.clone(), None, None),
            &["Alpha-4", "al%pha", "alpha-1", "alpha-2", "alpha-3", "beta"],
        ),
        (query(a, None, None), &["alpha-1", "alpha-2"]),
        (query(TeamFilter::NoTeam, None, None), &["al%pha", "beta"]),
        (
            query(any.clone(), Some("approved"), None),
            &["Alpha-4", "alpha-1", "alpha-3"],
        ),
        // Prefixes are case-sensitive and literal (no LIKE wildcards) on both backends.
        (
            query(any.clone(), None, Some("alpha")),
            &["alpha-1", "alpha-2", "alpha-3"],
        ),
        (query(any.clone(), None, Some("al%")), &["al%pha"]),
        (query(any.clone(), None, Some("a_")), &[]),
        (query(any, Some("nope"), None), &[]),
        (query(b, Some("approved"), Some("alpha")), &["alpha-3"]),
    ];
    for (query, expected) in cases {
        let page = store.list("subscription", &query).await.unwrap();
        let mut names: Vec<String> = page.items.into_iter().map(|o| o.name).collect();
        names.sort();
        assert_eq!(names, expected, "{query:?}");
    }
}

async fn audit_is_transactional(db: &TestDb) {
    let store = &db.store;
    let mut tx = store.begin("alice").await.unwrap();
    let app = tx
        .create(new("application", Some("t1"), "mobile"))
        .await
        .unwrap();
    let patch = ObjectPatch {
        state: Some(Some("active".into())),
        ..Default::default()
    };
    let updated = tx
        .update("application", &app.id, Some(1), patch)
        .await
        .unwrap();
    tx.record(AuditRecord {
        action: "approve".into(),
        kind: "application".into(),
        object_id: app.id.clone(),
        team_id: Some("t1".into()),
        after: Some(json!({ "by": "alice" })),
        ..Default::default()
    })
    .await
    .unwrap();
    let version = tx.commit().await.unwrap();

    let mut tx = store.begin("bob").await.unwrap();
    tx.delete("application", &app.id, None).await.unwrap();
    let version2 = tx.commit().await.unwrap();

    let query = AuditQuery {
        object_id: Some(app.id.clone()),
        ..Default::default()
    };
    let entries = store.audit(&query).await.unwrap().items;
    let summary: Vec<(&str, &str, i64)> = entries
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str(), e.store_version))
        .collect();
    assert_eq!(
        summary,
        [
            ("delete", "bob", version2),
            ("approve", "alice", version),
            ("update", "alice", version),
            ("create", "alice", version),
        ],
        "newest first, each with the version of its transaction"
    );
    let [delete, approve, update, create] = &entries[..] else {
        unreachable!()
    };
    assert_eq!(create.before, None);
    assert_eq!(
        create.after.as_ref(),
        Some(&serde_json::to_value(&app).unwrap())
    );
    assert_eq!(
        update.before.as_ref(),
        Some(&serde_json::to_value(&app).unwrap())
    );
    assert_eq!(
        update.after.as_ref(),
        Some(&serde_json::to_value(&updated).unwrap())
    );
    assert_eq!(approve.after, Some(json!({ "by": "alice" })));
    assert_eq!(
        delete.before.as_ref(),
        Some(&serde_json::to_value(&updated).unwrap())
    );
    assert_eq!(delete.after, None);
    assert!(
        entries
            .iter()
            .all(|e| e.team_id.as_deref() == Some("t1") && e.kind == "application")
    );
    assert!(
        entries
            .windows(2)
            .all(|w| w[0].id > w[1].id && w[0].at >= w[1].at)
    );

    // A dropped transaction leaves neither the change nor its audit entry.
    let mut tx = store.begin("mallory").await.unwrap();
    let ghost = tx
        .create(new("application", Some("t1"), "ghost"))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(store.get("application", &ghost.id).await.unwrap(), None);
    let ghost_audit = store
        .audit(&AuditQuery {
            object_id: Some(ghost.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(ghost_audit.items.is_empty());
    let mut tx = store.begin("mallory").await.unwrap();
    tx.create(new("application", Some("t1"), "ghost2"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let all = store.audit(&AuditQuery::default()).await.unwrap().items;
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|e| e.actor != "mallory"));

    // Paging and filters.
    let first = store
        .audit(&AuditQuery {
            limit: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(first.items.len(), 3);
    let next = AuditQuery {
        limit: Some(3),
        cursor: first.next_cursor,
        ..Default::default()
    };
    let second = store.audit(&next).await.unwrap();
    assert_eq!((second.items.len(), second.next_cursor), (1, None));
    assert_eq!(second.items[0].action, "create");
    let by_team = AuditQuery {
        team_id: Some("t2".into()),
        ..Default::default()
    };
    assert!(store.audit(&by_team).await.unwrap().items.is_empty());
    let by_kind = AuditQuery {
        kind: Some("application".into()),
        ..Default::default()
    };
    assert_eq!(store.audit(&by_kind).await.unwrap().items.len(), 4);
    let bad = AuditQuery {
        cursor: Some("nope".into()),
        ..Default::default()
    };
    assert!(matches!(
        store.audit(&bad).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn version_bumps_once_per_committed_change(db: &TestDb) {
    let store = &db.store;
    let v0 = store.current_version().await.unwrap();
    assert_eq!(v0, 0, "a new store starts at version 0");

    let mut tx = store.begin("alice").await.unwrap();
    assert_eq!(tx.version(), v0 + 1);
    let a = tx.create(new("team", None, "a")).await.unwrap();
    let b = tx.create(new("team", None, "b")).await.unwrap();
    tx.update("team", &a.id, None, ObjectPatch::default())
        .await
        .unwrap();
    assert_eq!(tx.commit().await.unwrap(), v0 + 1);
    assert_eq!(
        store.current_version().await.unwrap(),
        v0 + 1,
        "three writes, one bump"
    );
    let a = store.get("team", &a.id).await.unwrap().unwrap();
    assert_eq!((a.store_version, b.store_version), (v0 + 1, v0 + 1));

    // Reads only, and failed writes only: nothing changed, no bump.
    let mut tx = store.begin("alice").await.unwrap();
    tx.get("team", &a.id).await.unwrap();
    assert!(tx.delete("team", "missing", None).await.is_err());
    assert!(
        tx.update("team", &a.id, Some(99), ObjectPatch::default())
            .await
            .is_err()
    );
    assert!(tx.create(new("team", None, "a")).await.is_err());
    assert_eq!(tx.commit().await.unwrap(), v0 + 1);
    assert_eq!(store.current_version().await.unwrap(), v0 + 1);

    // Rolled back: no bump.
    let mut tx = store.begin("alice").await.unwrap();
    tx.create(new("team", None, "c")).await.unwrap();
    drop(tx);
    assert_eq!(store.current_version().await.unwrap(), v0 + 1);

    let mut tx = store.begin("alice").await.unwrap();
    tx.delete("team", &b.id, None).await.unwrap();
    assert_eq!(tx.commit().await.unwrap(), v0 + 2);
    assert_eq!(store.current_version().await.unwrap(), v0 + 2);
}

async fn releases_are_numbered_without_gaps(db: &TestDb) {
    let store = &db.store;
    let service = seed(store, vec![new("service", None, "orders")])
        .await
        .remove(0);

    // Two writers at once: serialised, so they get 1 and 2, never the same number.
    let release = |n: u32| {
        let store = store.clone();
        let id = service.id.clone();
        tokio::spawn(async move {
            let mut tx = store.begin(&format!("writer-{n}")).await.unwrap();
            let release = tx
                .create_release("service", &id, &json!({ "writer": n }), Some("concurrent"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            release.number
        })
    };
    let (a, b) = tokio::join!(release(1), release(2));
    let mut numbers = [a.unwrap(), b.unwrap()];
    numbers.sort();
    assert_eq!(numbers, [1, 2]);

    let mut tx = store.begin("alice").await.unwrap();
    let third = tx
        .create_release("service", &service.id, &json!({ "v": 3 }), None)
        .await
        .unwrap();
    // Numbering is per object.
    let other = tx
        .create_release("service", "other", &json!({}), None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!((third.number, other.number), (3, 1));
    assert_eq!(third.created_by.as_deref(), Some("alice"));

    let listed: Vec<i64> = store
        .list_releases("service", &service.id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.number)
        .collect();
    assert_eq!(listed, [1, 2, 3]);
    assert_eq!(
        store.latest_release("service", &service.id).await.unwrap(),
        Some(third.clone())
    );
    assert_eq!(
        store.get_release("service", &service.id, 3).await.unwrap(),
        Some(third)
    );
    assert_eq!(
        store.get_release("service", &service.id, 4).await.unwrap(),
        None
    );
    assert_eq!(
        store.latest_release("service", "nothing").await.unwrap(),
        None
    );

    // A dropped transaction does not consume a number.
    let mut tx = store.begin("alice").await.unwrap();
    tx.create_release("service", &service.id, &json!({}), None)
        .await
        .unwrap();
    drop(tx);
    let mut tx = store.begin("alice").await.unwrap();
    let fourth = tx
        .create_release("service", &service.id, &json!({}), None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(fourth.number, 4);

    // Releases are history: the database refuses to rewrite them.
    let rewrite = db
        .raw_execute("UPDATE releases SET note = 'rewritten'")
        .await;
    assert!(rewrite.is_err(), "releases must be immutable");
    let audit = AuditQuery {
        object_id: Some(service.id.clone()),
        ..Default::default()
    };
    let actions: Vec<String> = store
        .audit(&audit)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        ["release", "release", "release", "release", "create"]
    );
}

async fn tokens(db: &TestDb) {
    let store = &db.store;
    let mut tx = store.begin("alice").await.unwrap();
    let (token, secret) = tx.create_token("alice", "laptop", None).await.unwrap();
    let (expired, expired_secret) = tx
        .create_token("alice", "old", Some(now_ms() - 1_000))
        .await
        .unwrap();
    let (_, later_secret) = tx
        .create_token("bob", "ci", Some(now_ms() + 3_600_000))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    assert!(secret.starts_with("tp_"));
    assert_eq!(
        (token.user_id.as_str(), token.name.as_str(), token.revoked),
        ("alice", "laptop", false)
    );
    assert_eq!(
        store.lookup_token(&secret).await.unwrap(),
        Some(token.clone())
    );
    assert!(store.lookup_token(&later_secret).await.unwrap().is_some());
    assert_eq!(
        store.lookup_token(&expired_secret).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(store.lookup_token("tp_wrong").await.unwrap(), None);
    assert_eq!(
        store
            .lookup_token(&secret[..secret.len() - 1])
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.lookup_token("").await.unwrap(), None);

    store.touch_token(&token.id, 42).await.unwrap();
    assert_eq!(
        store
            .lookup_token(&secret)
            .await
            .unwrap()
            .unwrap()
            .last_used_at,
        Some(42)
    );
    assert!(matches!(
        store.touch_token("missing", 1).await,
        Err(StoreError::NotFound { .. })
    ));

    let mut tx = store.begin("alice").await.unwrap();
    let revoked = tx.revoke_token(&token.id).await.unwrap();
    assert!(matches!(
        tx.revoke_token("missing").await,
        Err(StoreError::NotFound { .. })
    ));
    tx.commit().await.unwrap();
    assert!(revoked.revoked);
    assert_eq!(store.lookup_token(&secret).await.unwrap(), None, "revoked");

    let names: Vec<(String, bool)> = store
        .list_tokens("alice")
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.revoked))
        .collect();
    assert_eq!(names, [("laptop".into(), true), ("old".into(), false)]);
    assert_eq!(expired.user_id, "alice");

    // The audit log names the token but holds neither the secret nor its hash.
    let query = AuditQuery {
        kind: Some(TOKEN_KIND.into()),
        ..Default::default()
    };
    let entries = store.audit(&query).await.unwrap().items;
    assert_eq!(entries.len(), 4);
    let text = serde_json::to_string(&entries).unwrap();
    assert!(!text.contains(&secret[3..]) && !text.contains("hash"));
}

async fn watch_sees_local_commit_at_once(db: &TestDb) {
    let store = &db.store;
    // A poll far in the future: only the in-process publish can deliver within the timeout.
    let mut rx = store.watch(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(*rx.borrow_and_update(), 0);
    let mut tx = store.begin("alice").await.unwrap();
    tx.create(new("team", None, "a")).await.unwrap();
    let version = tx.commit().await.unwrap();
    let seen = timeout(Duration::from_secs(1), rx.wait_for(|v| *v >= version)).await;
    assert_eq!(
        *seen.expect("local commit not seen within 1s").unwrap(),
        version
    );

    // A second watch shares the same watcher and starts at the current version.
    let rx2 = store.watch(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(*rx2.borrow(), version);
    assert!(!rx2.has_changed().unwrap());
}

async fn watch_sees_other_store_commit(db: &TestDb) {
    let other = db.open_another().await;
    // PostgreSQL: a poll far in the future, so only LISTEN/NOTIFY can deliver within 1s.
    // SQLite has no notifications across processes; its poll is what is tested.
    let (poll, within) = match other.backend() {
        Backend::Postgres => (Duration::from_secs(3600), Duration::from_secs(1)),
        Backend::Sqlite => (Duration::from_millis(20), Duration::from_secs(5)),
    };
    let mut rx = other.watch(poll).await.unwrap();
    for round in 1..=3 {
        let mut tx = db.store.begin("alice").await.unwrap();
        tx.create(new("team", None, &format!("t{round}")))
            .await
            .unwrap();
        let version = tx.commit().await.unwrap();
        let seen = timeout(within, rx.wait_for(|v| *v >= version)).await;
        let seen = *seen
            .unwrap_or_else(|_| panic!("commit {version} not seen within {within:?}"))
            .unwrap();
        assert_eq!(seen, version);
    }
    other.close().await;
}

async fn load_all_is_consistent(db: &TestDb) {
    let store = &db.store;
    seed(
        store,
        vec![
            new("service", None, "s1"),
            new("route", None, "r1"),
            new("route", None, "r2"),
        ],
    )
    .await;
    seed(store, vec![new("plan", None, "p1")]).await;
    let loaded = store
        .load_all(&["route", "service", "missing"])
        .await
        .unwrap();
    assert_eq!(loaded.version, 2);
    let kinds: Vec<&str> = loaded.objects.iter().map(|o| o.kind.as_str()).collect();
    assert_eq!(kinds, ["route", "route", "service"]);
    assert!(loaded.objects.iter().all(|o| o.store_version == 1));
}

async fn invalid_input(db: &TestDb) {
    let store = &db.store;
    assert!(matches!(store.begin("").await, Err(StoreError::Invalid(_))));
    let mut tx = store.begin("alice").await.unwrap();
    for bad in [
        new("Service", None, "x"),
        new("", None, "x"),
        new("service", None, ""),
        new("service", None, "bad\nname"),
        new("service", Some(""), "x"),
        new("service", Some("team with spaces"), "x"),
        NewObject {
            id: Some(String::new()),
            ..new("service", None, "x")
        },
    ] {
        let err = tx.create(bad.clone()).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{bad:?} gave {err}");
    }
    let renamed = tx.create(new("service", None, "ok")).await.unwrap();
    let err = tx
        .update(
            "service",
            &renamed.id,
            None,
            ObjectPatch {
                name: Some(String::new()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
    tx.commit().await.unwrap();
    assert!(matches!(
        store
            .list(
                "service",
                &ListQuery {
                    team: TeamFilter::Team(String::new()),
                    ..Default::default()
                }
            )
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        Store::open("mysql://localhost/x").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(Store::open("").await, Err(StoreError::Invalid(_))));
}

async fn reopen_keeps_everything(db: &TestDb) {
    let created = seed(&db.store, vec![new("service", Some("t"), "kept")])
        .await
        .remove(0);
    let mut tx = db.store.begin("alice").await.unwrap();
    let (_, secret) = tx.create_token("alice", "kept", None).await.unwrap();
    tx.commit().await.unwrap();
    db.store.close().await;
    // Opening again re-runs the migrations: they must be a no-op on a migrated database.
    let again = db.open_another().await;
    assert_eq!(
        again.get("service", &created.id).await.unwrap(),
        Some(created)
    );
    assert_eq!(again.current_version().await.unwrap(), 2);
    assert!(again.lookup_token(&secret).await.unwrap().is_some());
    let mut rx = again.watch(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(*rx.borrow_and_update(), 2);
    again.close().await;
}

async fn writers_wait_then_give_up(db: &TestDb) {
    let store = &db.store;
    let mut first = store.begin("first").await.unwrap();
    first.create(new("team", None, "a")).await.unwrap();
    // Another writer (here: another store, as another node would be) waits for the lock and
    // gives up after the lock timeout with a retryable error.
    let other = db.open_another().await;
    let started = std::time::Instant::now();
    let err = timeout(Duration::from_secs(30), other.begin("second"))
        .await
        .expect("the lock wait must be bounded")
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "gave up after {:?}",
        started.elapsed()
    );
    drop(first);
    // Once the first writer is gone, the second gets in.
    let mut second = other.begin("second").await.unwrap();
    second.create(new("team", None, "a")).await.unwrap();
    assert_eq!(second.commit().await.unwrap(), 1);
    other.close().await;
}

#[tokio::test]
async fn sqlite_plain_path_creates_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a").join("b").join("turnpike.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    assert!(path.exists());
    store.close().await;
}

#[tokio::test]
async fn postgres_unreachable_is_unavailable() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let err = Store::open("postgres://postgres@127.0.0.1:1/test?connect_timeout=2")
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}
