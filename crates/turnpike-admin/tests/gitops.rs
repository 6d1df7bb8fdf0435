//! `export` and `apply`: idempotence, dry runs, round trips between stores, deletes, and
//! errors that name the entry.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};
use turnpike_admin::gitops::{Action, apply, export};
use turnpike_store::Store;

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.path().join("s.db").display()))
        .await
        .unwrap();
    (dir, store)
}

fn document() -> Value {
    json!({
        "version": 1,
        "teams": [{"name": "acme", "description": "the API team"}, {"name": "shop"}],
        "upstreams": [{"team": "acme", "name": "backend",
                       "targets": [{"address": "127.0.0.1:9"}]}],
        "services": [{"team": "acme", "name": "orders", "upstream": "backend",
                      "visibility": "public", "approval": "manual", "state": "published"}],
        "routes": [
            {"team": "acme", "name": "list", "service": "orders", "paths": [{"prefix": "/orders"}]},
            {"team": "acme", "name": "one", "service": "orders",
             "paths": [{"template": "/orders/{id}"}]}
        ],
        "applications": [{"team": "shop", "name": "webshop"}],
        "credentials": [{"team": "shop", "name": "key", "application": "webshop",
                         "type": "api_key", "prefix": "tpk_abcd",
                         "hash": "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"}],
        "subscriptions": [{"team": "shop", "name": "webshop-orders", "application": "webshop",
                           "service_team": "acme", "service": "orders", "state": "approved"}]
    })
}

fn lines(changes: &[turnpike_admin::gitops::Change]) -> Vec<String> {
    changes.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn apply_is_idempotent_and_publishes() {
    let (_d, store) = store().await;
    let changes = apply(&store, &document(), "test", false).await.unwrap();
    let text = lines(&changes);
    assert!(text.contains(&"+ team acme".to_owned()), "{text:?}");
    assert!(text.contains(&"+ route acme/list".to_owned()), "{text:?}");
    assert!(
        text.contains(&"^ service acme/orders (new release)".to_owned()),
        "{text:?}"
    );
    let service = store
        .get_by_name(
            "service",
            Some(
                &store
                    .get_by_name("team", None, "acme")
                    .await
                    .unwrap()
                    .unwrap()
                    .id,
            ),
            "orders",
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(service.state.as_deref(), Some("published"));
    let release = store
        .latest_release("service", &service.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(release.number, 1);
    assert_eq!(release.content["routes"].as_array().unwrap().len(), 2);

    let version = store.current_version().await.unwrap();
    let again = apply(&store, &document(), "test", false).await.unwrap();
    assert!(again.is_empty(), "{:?}", lines(&again));
    assert_eq!(store.current_version().await.unwrap(), version);
}

#[tokio::test]
async fn dry_run_shows_the_diff_and_changes_nothing() {
    let (_d, store) = store().await;
    let version = store.current_version().await.unwrap();
    let dry = apply(&store, &document(), "test", true).await.unwrap();
    assert!(!dry.is_empty());
    assert_eq!(store.current_version().await.unwrap(), version);
    assert!(store.list_all("team").await.unwrap().is_empty());
    let real = apply(&store, &document(), "test", false).await.unwrap();
    assert_eq!(lines(&dry), lines(&real));
}

#[tokio::test]
async fn export_then_apply_elsewhere_round_trips() {
    let (_d, a) = store().await;
    apply(&a, &document(), "test", false).await.unwrap();
    let exported = export(&a).await.unwrap();
    let (_d2, b) = store().await;
    apply(&b, &exported, "test", false).await.unwrap();
    assert_eq!(export(&b).await.unwrap(), exported);
    // And the export, applied back to its source, changes nothing.
    assert!(
        apply(&a, &exported, "test", false)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn leaving_an_object_out_deletes_it_and_releases_the_service() {
    let (_d, store) = store().await;
    apply(&store, &document(), "test", false).await.unwrap();
    let mut doc = document();
    doc["routes"].as_array_mut().unwrap().pop();
    doc["services"][0]["description"] = json!("orders, v2");
    let changes = apply(&store, &doc, "test", false).await.unwrap();
    let text = lines(&changes);
    assert!(text.contains(&"- route acme/one".to_owned()), "{text:?}");
    assert!(
        text.contains(&"~ service acme/orders (description)".to_owned()),
        "{text:?}"
    );
    assert!(changes.iter().any(|c| c.action == Action::Release));

    // Collections the document leaves out are not managed by it.
    let only_teams = json!({"version": 1, "teams": [{"name": "acme", "description": "the API team"}, {"name": "shop"}]});
    assert!(
        apply(&store, &only_teams, "test", false)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn errors_name_the_entry_and_change_nothing() {
    let (_d, store) = store().await;
    apply(&store, &document(), "test", false).await.unwrap();
    let version = store.current_version().await.unwrap();

    let mut doc = document();
    doc["services"][0]["approval"] = json!("sometimes");
    let e = apply(&store, &doc, "test", false).await.unwrap_err();
    assert!(e.to_string().contains("services[0].approval"), "{e}");

    let mut doc = document();
    doc["routes"][0]["team"] = json!("nobody");
    let e = apply(&store, &doc, "test", false).await.unwrap_err();
    assert!(e.to_string().contains("nobody"), "{e}");

    let e = apply(&store, &json!({"version": 1, "widgets": []}), "test", false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("widgets"), "{e}");

    // The upstream is still used by the service: leaving it out is refused.
    let mut doc = document();
    doc["upstreams"] = json!([]);
    let e = apply(&store, &doc, "test", false).await.unwrap_err();
    assert!(e.to_string().contains("backend"), "{e}");

    let mut doc = document();
    doc["credentials"][0]["password"] = json!("hunter2");
    doc["credentials"][0]["type"] = json!("basic");
    let e = apply(&store, &doc, "test", false).await.unwrap_err();
    assert!(e.to_string().contains("password"), "{e}");

    assert_eq!(store.current_version().await.unwrap(), version);
}

#[tokio::test]
async fn a_release_keeps_the_routes_a_document_does_not_manage() {
    let (_d, store) = store().await;
    apply(&store, &document(), "test", false).await.unwrap();
    let mut doc = json!({"version": 1, "services": document()["services"].clone()});
    doc["services"][0]["description"] = json!("now with a description");
    let changes = apply(&store, &doc, "test", false).await.unwrap();
    assert!(changes.iter().any(|c| c.action == Action::Release));
    let team = store
        .get_by_name("team", None, "acme")
        .await
        .unwrap()
        .unwrap();
    let service = store
        .get_by_name("service", Some(&team.id), "orders")
        .await
        .unwrap()
        .unwrap();
    let release = store
        .latest_release("service", &service.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(release.number, 2);
    assert_eq!(
        release.content["routes"].as_array().unwrap().len(),
        2,
        "the routes the document leaves alone stay in the release"
    );
}

#[tokio::test]
async fn dropping_an_object_a_kept_one_refers_to_is_refused() {
    let (_d, store) = store().await;
    apply(&store, &document(), "test", false).await.unwrap();
    let version = store.current_version().await.unwrap();
    // The document drops the service and its routes, but adds a route naming it: the new
    // route was never in the store, so only a check after the deletes can see it dangle.
    let mut doc = document();
    doc["services"] = json!([]);
    doc["subscriptions"] = json!([]);
    doc["routes"] = json!([{"team": "acme", "name": "new", "service": "orders",
                            "paths": [{"prefix": "/new"}]}]);
    let e = apply(&store, &doc, "test", false).await.unwrap_err();
    assert!(e.to_string().contains("orders"), "{e}");
    assert_eq!(store.current_version().await.unwrap(), version);
}
