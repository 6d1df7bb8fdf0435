//! The call-log store (segments) against both backends: every test below exists as
//! `sqlite::<name>` and `postgres::<name>`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::borrow::Cow;
use std::collections::HashSet;

use common::TestDb;
use turnpike_store::{CallLogQuery, CallLogRecord, CallLogRow, CallLogScope, Store};

both_backends!(
    search_pages_prune_and_cap,
    every_field_survives_a_round_trip,
    overlapping_segments_page_in_time_order,
    ties_in_time_across_segments_page_by_id,
    filters_match_exactly_past_the_summaries,
    request_id_lookup_reads_only_its_segments,
    the_gateways_own_ids_are_found_by_time_without_keys,
    prune_trims_a_straddling_segment_and_keeps_ids,
    large_batches_are_split_into_segments,
    calls_of_earlier_versions_are_moved_into_segments,
    hundreds_of_segments_are_walked_pruned_and_capped,
    a_corrupt_segment_is_an_error,
    two_nodes_move_and_prune_at_once,
    a_search_budget_ends_pages_early_and_cursors_go_on,
    budgeted_pages_over_overlapping_segments_miss_nothing,
    a_batch_is_split_by_arrival_window,
);

fn call(at: i64, request_id: &str, service: &str, status: i64) -> CallLogRecord {
    CallLogRecord {
        at,
        request_id: request_id.into(),
        client_ip: "127.0.0.1".into(),
        protocol: "HTTP/1.1".into(),
        method: "GET".into(),
        path: "/".into(),
        service: Some(service.into()),
        route: Some(format!("route-{service}")),
        status,
        completed: true,
        ..CallLogRecord::default()
    }
}

async fn insert(store: &Store, calls: &[CallLogRecord]) {
    let rows: Vec<CallLogRow<'_>> = calls.iter().map(CallLogRow::from).collect();
    assert_eq!(
        store.insert_call_logs(&rows).await.unwrap(),
        calls.len() as u64
    );
}

/// Every page of `query`, concatenated.
async fn all_pages(store: &Store, query: CallLogQuery) -> Vec<CallLogRecord> {
    pages(store, query).await.concat()
}

/// Every page of `query`, following cursors; each cursor must move on from the one before
/// and be before `to`.
async fn pages(store: &Store, mut query: CallLogQuery) -> Vec<Vec<CallLogRecord>> {
    let mut out = Vec::new();
    loop {
        let page = store.search_call_logs(&query).await.unwrap();
        out.push(page.items);
        match page.next_cursor {
            Some(c) => {
                assert!(
                    query
                        .cursor
                        .as_ref()
                        .is_none_or(|before| cursor_key(&c) < cursor_key(before)),
                    "cursor {c} does not move on from {:?}",
                    query.cursor
                );
                assert!(
                    query.to.is_none_or(|to| cursor_key(&c) < (to, 0)),
                    "cursor {c} is not before `to`, {:?}",
                    query.to
                );
                query.cursor = Some(c);
            }
            None => return out,
        }
    }
}

/// A cursor's `(time, id)`.
fn cursor_key(cursor: &str) -> (i64, i64) {
    let (at, id) = cursor.split_once('.').unwrap();
    (at.parse().unwrap(), id.parse().unwrap())
}

/// Every call, a page of `limit` at a time.
async fn every_call(store: &Store, limit: u32) -> Vec<CallLogRecord> {
    all_pages(
        store,
        CallLogQuery {
            limit: Some(limit),
            ..CallLogQuery::default()
        },
    )
    .await
}

/// (time, request id) of each call, in order.
fn keys(calls: &[CallLogRecord]) -> Vec<(i64, String)> {
    calls.iter().map(|c| (c.at, c.request_id.clone())).collect()
}

/// `calls` newest first, as a search orders them (ties: written later first).
fn newest_first(mut calls: Vec<CallLogRecord>) -> Vec<(i64, String)> {
    calls.reverse();
    calls.sort_by_key(|c| std::cmp::Reverse(c.at));
    keys(&calls)
}

async fn search_pages_prune_and_cap(db: &TestDb) {
    let store = &db.store;
    // 450 calls in five batches; two share each timestamp.
    let calls: Vec<CallLogRecord> = (0..450)
        .map(|i| {
            call(
                1_000 + i / 2,
                &format!("r{i}"),
                if i % 3 == 0 { "a" } else { "b" },
                200 + i % 5 * 100,
            )
        })
        .collect();
    for batch in calls.chunks(90) {
        insert(store, batch).await;
    }
    let mut seen = HashSet::new();
    let mut last = (i64::MAX, i64::MAX);
    let found = every_call(store, 100).await;
    for c in &found {
        assert!((c.at, c.id) < last, "out of order at {}", c.request_id);
        last = (c.at, c.id);
        assert!(seen.insert(c.id), "call {} twice", c.id);
    }
    assert_eq!(found.len(), 450);
    assert_eq!(keys(&found), newest_first(calls.clone()));
    let errors = all_pages(
        store,
        CallLogQuery {
            status_class: Some(5),
            service: Some("a".into()),
            limit: Some(7),
            ..CallLogQuery::default()
        },
    )
    .await;
    let expected: Vec<CallLogRecord> = calls
        .iter()
        .filter(|c| c.status / 100 == 5 && c.service.as_deref() == Some("a"))
        .cloned()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(keys(&errors), newest_first(expected));
    let scoped = store
        .search_call_logs(&CallLogQuery {
            scope: Some(CallLogScope::default()),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    assert!(scoped.items.is_empty());
    assert!(
        store
            .search_call_logs(&CallLogQuery {
                cursor: Some("x".into()),
                ..CallLogQuery::default()
            })
            .await
            .is_err()
    );
    // Times 1000..=1224: before 1100 there are 200 calls, in the first three batches.
    assert_eq!(store.prune_call_logs(1_100).await.unwrap(), 200);
    assert_eq!(store.count_call_logs().await.unwrap(), 250);
    assert_eq!(store.prune_call_logs(1_100).await.unwrap(), 0);
    // The newest 100 stay: the cap splits a segment.
    assert_eq!(store.cap_call_logs(100).await.unwrap(), 150);
    assert_eq!(store.count_call_logs().await.unwrap(), 100);
    assert_eq!(store.cap_call_logs(100).await.unwrap(), 0);
    let kept = all_pages(store, CallLogQuery::default()).await;
    let newest: Vec<(i64, String)> = newest_first(calls).into_iter().take(100).collect();
    assert_eq!(keys(&kept), newest);
}

async fn every_field_survives_a_round_trip(db: &TestDb) {
    let full = CallLogRecord {
        id: 0,
        at: 1_700_000_000_123,
        request_id: "req-1".into(),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        client_ip: "2001:db8::1".into(),
        protocol: "HTTP/2".into(),
        method: "PATCH".into(),
        host: Some("api.example.com".into()),
        path: "/v1/things/ünïcode \"quoted\"".into(),
        route: Some("team/svc/route".into()),
        service: Some("svc-id".into()),
        application: Some("app-id".into()),
        application_name: Some("The App".into()),
        team: Some("team".into()),
        status: 418,
        bytes_in: 12_345,
        bytes_out: -1,
        duration_us: 9_876_543_210,
        upstream_us: Some(42),
        upstream: Some("pool".into()),
        upstream_target: Some("10.0.0.7:8080".into()),
        attempts: 3,
        cache: Some("MISS".into()),
        error: Some("upstream_timeout".into()),
        user_agent: Some("curl/8".into()),
        completed: false,
    };
    let bare = CallLogRecord {
        at: 5,
        request_id: "req-2".into(),
        ..CallLogRecord::default()
    };
    insert(&db.store, &[full.clone(), bare.clone()]).await;
    let found = all_pages(&db.store, CallLogQuery::default()).await;
    assert_eq!(found.len(), 2);
    assert!(found[0].id > 0 && found[1].id > 0);
    assert_eq!(
        CallLogRecord {
            id: 0,
            ..found[0].clone()
        },
        full
    );
    assert_eq!(
        CallLogRecord {
            id: 0,
            ..found[1].clone()
        },
        bare
    );
    // A row may own its address text (the writer formats it).
    let mut row = CallLogRow::from(&full);
    row.client_ip = Cow::Owned("192.0.2.1".into());
    row.request_id = "req-3";
    db.store.insert_call_logs(&[row]).await.unwrap();
    let third = db
        .store
        .search_call_logs(&CallLogQuery {
            request_id: Some("req-3".into()),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(third.items.len(), 1);
    assert_eq!(third.items[0].client_ip, "192.0.2.1");
}

/// Calls arrive out of order across batches (a slow request is written after quick ones that
/// came later): pages still follow arrival time.
async fn ties_in_time_across_segments_page_by_id(db: &TestDb) {
    let store = &db.store;
    // An older segment reaching later than a newer one, sharing its earliest time: the
    // newer segment's call at 5 ranks above the older segment's calls at 5 (higher id), so
    // the walk may not stop at the newer segment because the page is full of calls at 5.
    insert(
        store,
        &[
            call(5, "a0", "s", 200),
            call(5, "a1", "s", 200),
            call(10, "a2", "s", 200),
        ],
    )
    .await;
    insert(store, &[call(5, "b0", "s", 200)]).await;
    // Many more ties: every batch draws from the times 1 to 5.
    for batch in 0..5i64 {
        let part: Vec<CallLogRecord> = (0..7i64)
            .map(|i| call(1 + (i * 3 + batch) % 5, &format!("c{batch}-{i}"), "s", 200))
            .collect();
        insert(store, &part).await;
    }
    let all = every_call(store, 100).await;
    assert_eq!(all.len(), 39);
    let mut sorted = all.clone();
    sorted.sort_by_key(|c| std::cmp::Reverse((c.at, c.id)));
    assert_eq!(all, sorted);
    let first = store
        .search_call_logs(&CallLogQuery {
            limit: Some(2),
            to: Some(11),
            from: Some(5),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = first.items.iter().map(|c| c.request_id.as_str()).collect();
    // The newest at 5 is the last batch's (highest id), whatever segment it is in.
    assert_eq!(ids[0], "a2");
    assert_eq!(first.items[1].at, 5);
    assert_eq!(
        first.items[1].id,
        all.iter()
            .filter(|c| c.at == 5)
            .map(|c| c.id)
            .max()
            .unwrap()
    );
    for limit in 1..=7 {
        let paged = every_call(store, limit).await;
        assert_eq!(paged, all, "limit {limit}");
    }
}

async fn overlapping_segments_page_in_time_order(db: &TestDb) {
    let store = &db.store;
    let mut calls = Vec::new();
    for batch in 0..6i64 {
        // Each batch spans a wide range and overlaps every other.
        let part: Vec<CallLogRecord> = (0..40i64)
            .map(|i| {
                let at = 10_000 + (i * 37 + batch * 11) % 400;
                call(at, &format!("b{batch}-{i}"), "s", 200)
            })
            .collect();
        insert(store, &part).await;
        calls.extend(part);
    }
    for limit in [1, 3, 17, 240] {
        let found = every_call(store, limit).await;
        assert_eq!(found.len(), 240, "limit {limit}");
        let mut sorted = found.clone();
        sorted.sort_by_key(|c| std::cmp::Reverse((c.at, c.id)));
        assert_eq!(found, sorted, "limit {limit}");
        let distinct: HashSet<i64> = found.iter().map(|c| c.id).collect();
        assert_eq!(distinct.len(), 240);
    }
    // A time window cuts across segments.
    let window = all_pages(
        store,
        CallLogQuery {
            from: Some(10_100),
            to: Some(10_200),
            limit: Some(9),
            ..CallLogQuery::default()
        },
    )
    .await;
    let expected = calls
        .iter()
        .filter(|c| (10_100..10_200).contains(&c.at))
        .count();
    assert_eq!(window.len(), expected);
    assert!(window.iter().all(|c| (10_100..10_200).contains(&c.at)));
}

/// A segment with more services or routes than its summary lists is still searched, and one
/// whose summary rules a value out is skipped without missing anything.
async fn filters_match_exactly_past_the_summaries(db: &TestDb) {
    let store = &db.store;
    let many: Vec<CallLogRecord> = (0..200)
        .map(|i| {
            let mut c = call(
                20_000 + i,
                &format!("m{i}"),
                &format!("svc{i}"),
                200 + i % 4,
            );
            c.application = Some(format!("app{}", i % 3));
            c
        })
        .collect();
    let few: Vec<CallLogRecord> = (0..50)
        .map(|i| {
            let mut c = call(20_000 + i, &format!("f{i}"), "svc7", 503);
            c.application = Some("app9".into());
            c
        })
        .collect();
    insert(store, &many).await;
    insert(store, &few).await;
    let by = |q: CallLogQuery| async move { all_pages(store, q).await };
    let svc7 = by(CallLogQuery {
        service: Some("svc7".into()),
        limit: Some(10),
        ..CallLogQuery::default()
    })
    .await;
    assert_eq!(svc7.len(), 51);
    assert!(svc7.iter().all(|c| c.service.as_deref() == Some("svc7")));
    let route = by(CallLogQuery {
        route: Some("route-svc150".into()),
        ..CallLogQuery::default()
    })
    .await;
    assert_eq!(keys(&route), [(20_150, "m150".to_owned())]);
    let status = by(CallLogQuery {
        status: Some(202),
        ..CallLogQuery::default()
    })
    .await;
    assert_eq!(status.len(), 50);
    assert!(status.iter().all(|c| c.status == 202));
    let errors = by(CallLogQuery {
        status_class: Some(5),
        ..CallLogQuery::default()
    })
    .await;
    assert_eq!(errors.len(), 50);
    let app = by(CallLogQuery {
        application: Some("app1".into()),
        ..CallLogQuery::default()
    })
    .await;
    assert_eq!(app.len(), 67);
    let scoped = by(CallLogQuery {
        scope: Some(CallLogScope {
            services: vec!["svc3".into(), "svc4".into()],
            applications: vec!["app9".into()],
        }),
        ..CallLogQuery::default()
    })
    .await;
    assert_eq!(scoped.len(), 52);
    let none = by(CallLogQuery {
        service: Some("svc7".into()),
        application: Some("app2".into()),
        ..CallLogQuery::default()
    })
    .await;
    assert!(none.is_empty());
}

async fn request_id_lookup_reads_only_its_segments(db: &TestDb) {
    let store = &db.store;
    // The same id in two batches (a client reusing its request id), and in one batch twice.
    insert(store, &[call(1, "dup", "s", 200), call(2, "x", "s", 200)]).await;
    insert(store, &[call(3, "dup", "s", 500), call(4, "dup", "t", 201)]).await;
    let found = all_pages(
        store,
        CallLogQuery {
            request_id: Some("dup".into()),
            limit: Some(1),
            ..CallLogQuery::default()
        },
    )
    .await;
    assert_eq!(
        keys(&found),
        [(4, "dup".into()), (3, "dup".into()), (1, "dup".into())]
    );
    let narrowed = all_pages(
        store,
        CallLogQuery {
            request_id: Some("dup".into()),
            service: Some("s".into()),
            ..CallLogQuery::default()
        },
    )
    .await;
    assert_eq!(keys(&narrowed), [(3, "dup".into()), (1, "dup".into())]);
    for missing in ["nope", "", "DUP"] {
        let page = store
            .search_call_logs(&CallLogQuery {
                request_id: Some(missing.into()),
                ..CallLogQuery::default()
            })
            .await
            .unwrap();
        assert!(page.items.is_empty(), "{missing:?}");
    }
    // The gateway's own ids (UUIDv7) are keyed by their time and a hash: ids of the same
    // millisecond, in one segment and in two, are each found alone.
    let v7 = |ms: u64, tail: u8| {
        uuid::Builder::from_unix_timestamp_millis(ms, &[tail; 10])
            .into_uuid()
            .to_string()
    };
    let ms = 1_800_000_000_000;
    let (a, b, c) = (v7(ms, 1), v7(ms, 2), v7(ms + 1, 3));
    insert(store, &[call(10, &a, "s", 200), call(10, &b, "s", 200)]).await;
    insert(
        store,
        &[call(11, &c, "s", 200), call(11, "other", "s", 200)],
    )
    .await;
    for id in [&a, &b, &c] {
        let page = store
            .search_call_logs(&CallLogQuery {
                request_id: Some(id.clone()),
                ..CallLogQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(keys(&page.items).len(), 1, "{id}");
        assert_eq!(&page.items[0].request_id, id);
    }
    // Another form of the same UUID is another request id.
    let page = store
        .search_call_logs(&CallLogQuery {
            request_id: Some(a.replace('-', "")),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    assert!(page.items.is_empty());
}

/// A UUIDv7 made when its call arrived (the gateway's own ids) writes no key in
/// `call_log_ids`: a lookup finds it among the segments that arrived around the id's time.
/// Any other id, and a UUIDv7 made further from its call's arrival, is keyed and found as
/// before.
async fn the_gateways_own_ids_are_found_by_time_without_keys(db: &TestDb) {
    let store = &db.store;
    let v7 = |ms: i64, tail: u8| {
        uuid::Builder::from_unix_timestamp_millis(u64::try_from(ms).unwrap(), &[tail; 10])
            .into_uuid()
            .to_string()
    };
    let t = 1_800_000_000_000;
    let (own, twin, edge, late, early) = (
        v7(t, 1),
        v7(t, 2),
        v7(t - 100, 3),
        v7(t - 101, 4),
        v7(t + 101, 5),
    );
    // `own` is used again by a later call in another segment (a client resending it).
    insert(
        store,
        &[
            call(t, &own, "s", 200),
            call(t, &twin, "s", 200),
            call(t, &edge, "s", 200),
            call(t, &late, "s", 200),
            call(t, &early, "s", 200),
            call(t, "client-id", "s", 200),
        ],
    )
    .await;
    insert(store, &[call(t + 50, &v7(t + 50, 6), "s", 200)]).await;
    insert(store, &[call(t + 99, &own, "s", 500)]).await;
    // Segments far from `t`, with a call whose id was made at `t` but arrived much later.
    let much_later = v7(t, 7);
    for i in 1..=5 {
        insert(
            store,
            &[call(t + i * 20_000, &v7(t + i * 20_000, 8), "s", 200)],
        )
        .await;
    }
    insert(store, &[call(t + 60_000, &much_later, "s", 200)]).await;
    // Keyed: the two made past the slack, the one made much earlier, the client's id.
    assert_eq!(
        db.raw_count("SELECT COUNT(*) FROM call_log_ids")
            .await
            .unwrap(),
        4
    );
    let lookup = |id: String| async move {
        all_pages(
            store,
            CallLogQuery {
                request_id: Some(id),
                limit: Some(1),
                ..CallLogQuery::default()
            },
        )
        .await
    };
    assert_eq!(
        keys(&lookup(own.clone()).await),
        [(t + 99, own.clone()), (t, own.clone())]
    );
    for (id, at) in [
        (twin, t),
        (edge, t),
        (late, t),
        (early, t),
        ("client-id".to_owned(), t),
        (much_later.clone(), t + 60_000),
    ] {
        assert_eq!(keys(&lookup(id.clone()).await), [(at, id.clone())], "{id}");
    }
    // An id nobody used, made at `t`, matches nothing read around `t`.
    assert!(lookup(v7(t, 9)).await.is_empty());
    // Pruned with their segments, keyed or not.
    store.prune_call_logs(t + 60_000).await.unwrap();
    assert!(lookup(own).await.is_empty());
    assert_eq!(
        keys(&lookup(much_later.clone()).await),
        [(t + 60_000, much_later)]
    );
    assert_eq!(
        db.raw_count("SELECT COUNT(*) FROM call_log_ids")
            .await
            .unwrap(),
        1
    );
}

async fn prune_trims_a_straddling_segment_and_keeps_ids(db: &TestDb) {
    let store = &db.store;
    let calls: Vec<CallLogRecord> = (0..10)
        .map(|i| call(100 + i, &format!("p{i}"), "s", 200))
        .collect();
    insert(store, &calls).await;
    let before = all_pages(store, CallLogQuery::default()).await;
    assert_eq!(store.prune_call_logs(104).await.unwrap(), 4);
    let after = all_pages(store, CallLogQuery::default()).await;
    assert_eq!(after.len(), 6);
    // The calls that stay keep their ids: a cursor taken before the trim still works.
    assert_eq!(after[..], before[..6]);
    let cursor = format!("{}.{}", before[2].at, before[2].id);
    let rest = store
        .search_call_logs(&CallLogQuery {
            cursor: Some(cursor),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.items[..], before[3..6]);
    // The trimmed call is gone from request-id lookups too.
    let gone = store
        .search_call_logs(&CallLogQuery {
            request_id: Some("p1".into()),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    assert!(gone.items.is_empty());
    // Summaries follow the trim: the segment's earliest call is now 104.
    assert!(
        store
            .search_call_logs(&CallLogQuery {
                to: Some(104),
                ..CallLogQuery::default()
            })
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(store.prune_call_logs(1_000).await.unwrap(), 6);
    assert_eq!(store.count_call_logs().await.unwrap(), 0);
}

async fn large_batches_are_split_into_segments(db: &TestDb) {
    let store = &db.store;
    let n = turnpike_store::MAX_SEGMENT_CALLS + 5;
    let calls: Vec<CallLogRecord> = (0..n)
        .map(|i| call(i as i64, &format!("l{i}"), "s", 200))
        .collect();
    insert(store, &calls).await;
    assert_eq!(store.count_call_logs().await.unwrap(), n as i64);
    let page = store
        .search_call_logs(&CallLogQuery {
            limit: Some(10),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    let newest: Vec<i64> = page.items.iter().map(|c| c.at).collect();
    let expected: Vec<i64> = (0..10).map(|i| (n - 1 - i) as i64).collect();
    assert_eq!(newest, expected);
    let first = store
        .search_call_logs(&CallLogQuery {
            request_id: Some("l0".into()),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(keys(&first.items), [(0, "l0".into())]);
}

/// Calls stored one row each by earlier versions are moved into segments, then found as
/// before; moving twice moves nothing.
async fn calls_of_earlier_versions_are_moved_into_segments(db: &TestDb) {
    for i in 0..5 {
        let sql = format!(
            "INSERT INTO call_logs (at, request_id, client_ip, protocol, method, path, service, \
             status, bytes_in, bytes_out, duration_us, attempts, completed, user_agent) VALUES \
             ({}, 'old{i}', '10.0.0.1', 'HTTP/1.1', 'GET', '/old', 'svc', 200, 1, 2, 3, 1, TRUE, \
             'agent')",
            500 + i
        );
        db.raw_execute(&sql).await.unwrap();
    }
    insert(&db.store, &[call(900, "new", "svc", 200)]).await;
    // The two older than the retention limit go rather than move.
    let done = db.store.move_legacy_call_logs(502).await.unwrap();
    assert_eq!((done.expired, done.moved), (2, 3));
    let done = db.store.move_legacy_call_logs(502).await.unwrap();
    assert_eq!((done.expired, done.moved), (0, 0));
    assert_eq!(db.store.count_call_logs().await.unwrap(), 4);
    let found = all_pages(&db.store, CallLogQuery::default()).await;
    assert_eq!(found[0].request_id, "new");
    let old: Vec<&str> = found[1..].iter().map(|c| c.request_id.as_str()).collect();
    assert_eq!(old, ["old4", "old3", "old2"]);
    // Moved calls have newer ids than "new", but the cap keeps the newest by time.
    assert!(found[1].id > found[0].id);
    assert_eq!(db.store.cap_call_logs(2).await.unwrap(), 2);
    let kept = all_pages(&db.store, CallLogQuery::default()).await;
    assert_eq!(keys(&kept), [(900, "new".into()), (504, "old4".into())]);
    assert_eq!(found[1].user_agent.as_deref(), Some("agent"));
    assert_eq!(
        (found[1].bytes_in, found[1].bytes_out, found[1].duration_us),
        (1, 2, 3)
    );
    let left = db.raw_execute("DELETE FROM call_logs").await.unwrap();
    assert_eq!(left, 0);
}

async fn hundreds_of_segments_are_walked_pruned_and_capped(db: &TestDb) {
    let store = &db.store;
    // 300 segments of two calls: more than a page of segment summaries (256) and than a
    // prune transaction deletes (8).
    for i in 0..300i64 {
        let service = if i == 0 { "first" } else { "s" };
        insert(
            store,
            &[
                call(10_000 + i * 10, &format!("r{i}-0"), service, 200),
                call(10_000 + i * 10 + 1, &format!("r{i}-1"), service, 200),
            ],
        )
        .await;
    }
    // Only the oldest segment matches: the walk reads every page of summaries to reach it.
    let first = all_pages(
        store,
        CallLogQuery {
            service: Some("first".into()),
            limit: Some(1),
            ..CallLogQuery::default()
        },
    )
    .await;
    assert_eq!(
        keys(&first),
        [(10_001, "r0-1".to_string()), (10_000, "r0-0".to_string())]
    );
    let all = every_call(store, 100).await;
    assert_eq!(all.len(), 600);
    assert!(all.windows(2).all(|w| w[0].at > w[1].at));
    // The cap walks back past a page of summaries (256 segments) and keeps the newest 541
    // calls: segments 30 to 299 and the second call of segment 29.
    assert_eq!(store.cap_call_logs(541).await.unwrap(), 59);
    let kept = every_call(store, 1000).await;
    assert_eq!(kept.len(), 541);
    assert_eq!(kept.last().unwrap().request_id, "r29-1");
    assert_eq!(kept[0].request_id, "r299-1");
    // Retention at the second call of segment 100: segments 29 to 99 go whole (71, more
    // than a transaction deletes) and segment 100 loses its first call.
    assert_eq!(store.prune_call_logs(11_001).await.unwrap(), 142);
    assert_eq!(store.count_call_logs().await.unwrap(), 399);
    let left = every_call(store, 1000).await;
    assert_eq!(left.last().unwrap().request_id, "r100-1");
}

async fn a_corrupt_segment_is_an_error(db: &TestDb) {
    let store = &db.store;
    insert(store, &[call(1, "a", "s", 200)]).await;
    db.raw_execute("UPDATE call_log_segments SET body = NULL")
        .await
        .unwrap_err();
    let sql = if db.url.starts_with("sqlite") {
        "UPDATE call_log_segments SET body = X'00ff'"
    } else {
        "UPDATE call_log_segments SET body = '\\x00ff'"
    };
    db.raw_execute(sql).await.unwrap();
    let error = store
        .search_call_logs(&CallLogQuery::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("call-log segment"), "{error}");
    // An encoding this version does not know is named as such.
    db.raw_execute("UPDATE call_log_segments SET encoding = 7")
        .await
        .unwrap();
    let error = store
        .search_call_logs(&CallLogQuery::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("encoding 7"), "{error}");
}

async fn two_nodes_move_and_prune_at_once(db: &TestDb) {
    let other = db.open_another().await;
    // 5,000 calls of an earlier version (more than two moving steps), at 1000 to 5999.
    db.raw_execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 4999) \
         INSERT INTO call_logs (at, request_id, client_ip, protocol, method, path, status, \
         bytes_in, bytes_out, duration_us, attempts, completed) \
         SELECT 1000 + i, 'old' || i, '10.0.0.1', 'HTTP/1.1', 'GET', '/', 200, 0, 0, 1, 1, TRUE \
         FROM n",
    )
    .await
    .unwrap();
    let (a, b) = tokio::join!(
        db.store.move_legacy_call_logs(0),
        other.move_legacy_call_logs(0)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    // Each call moved by one node only.
    assert_eq!(a.moved + b.moved, 5_000);
    assert_eq!(db.store.count_call_logs().await.unwrap(), 5_000);
    let all = every_call(&db.store, 1_000).await;
    let distinct: HashSet<&str> = all.iter().map(|c| c.request_id.as_str()).collect();
    assert_eq!((all.len(), distinct.len()), (5_000, 5_000));
    // Both prune at once, deleting and trimming the same segments: every call older than
    // 3500 goes, counted once, and neither node fails (on PostgreSQL, they wait for each
    // other's locks rather than deadlock).
    let (a, b) = tokio::join!(
        db.store.prune_call_logs(3_500),
        other.prune_call_logs(3_500)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 2_500);
    let left = every_call(&other, 1_000).await;
    assert_eq!(left.len(), 2_500);
    assert!(left.iter().all(|c| c.at >= 3_500));
}

/// Twenty segments one after another, 50 calls each; each holds a 400 (so its summary cannot
/// rule out a search for 404) and every fourth holds two 404s.
fn twenty_segments() -> Vec<Vec<CallLogRecord>> {
    (0..20i64)
        .map(|seg| {
            (0..50i64)
                .map(|i| {
                    let status = match i {
                        0 => 400,
                        7 | 31 if seg % 4 == 0 => 404,
                        _ => 200,
                    };
                    call(50_000 + seg * 100 + i, &format!("s{seg}-{i}"), "s", status)
                })
                .collect()
        })
        .collect()
}

async fn a_search_budget_ends_pages_early_and_cursors_go_on(db: &TestDb) {
    let store = &db.store;
    let segments = twenty_segments();
    for segment in &segments {
        insert(store, segment).await;
    }
    let not_found = |max_segments, max_summaries| CallLogQuery {
        status: Some(404),
        limit: Some(50),
        max_segments,
        max_summaries,
        ..CallLogQuery::default()
    };
    let unbounded = store
        .search_call_logs(&not_found(None, None))
        .await
        .unwrap();
    assert_eq!(unbounded.items.len(), 10);
    assert_eq!(unbounded.next_cursor, None);

    // Four segments read: the page holds the 404s of the newest four (segment 16's two),
    // and its cursor takes the next page on from segment 15's latest call.
    let first = store
        .search_call_logs(&not_found(Some(4), None))
        .await
        .unwrap();
    let names: Vec<&str> = first.items.iter().map(|c| c.request_id.as_str()).collect();
    assert_eq!(names, ["s16-31", "s16-7"]);
    assert_eq!(
        first.next_cursor.as_deref(),
        Some("51549.9223372036854775807")
    );
    // Three a page: the first holds none (no 404 in segments 17 to 19), yet goes on.
    let empty = store
        .search_call_logs(&not_found(Some(3), None))
        .await
        .unwrap();
    assert!(empty.items.is_empty());
    assert_eq!(
        empty.next_cursor.as_deref(),
        Some("51649.9223372036854775807")
    );
    let by_three = pages(store, not_found(Some(3), None)).await;
    assert_eq!(by_three.len(), 7, "20 segments, 3 a page");
    assert_eq!(by_three.concat(), unbounded.items);
    // 120 calls: a page stops after the segment that reaches them, the third.
    let by_calls = pages(
        store,
        CallLogQuery {
            max_calls: Some(120),
            ..not_found(None, None)
        },
    )
    .await;
    assert_eq!(by_calls.len(), 7);
    assert_eq!(by_calls.concat(), unbounded.items);
    // `to` inside segment 10: no page is cut where its cursor would not be before `to`.
    let before_ten = pages(
        store,
        CallLogQuery {
            to: Some(51_020),
            ..not_found(Some(1), None)
        },
    )
    .await;
    assert_eq!(before_ten.len(), 11, "segments 10 to 0, one a page");
    assert_eq!(
        ids_of(&before_ten.concat()),
        ["s8-31", "s8-7", "s4-31", "s4-7", "s0-31", "s0-7"]
    );
    // Every page is also cut at four summaries, whether read or skipped.
    let by_summaries = pages(store, not_found(Some(100), Some(4))).await;
    assert_eq!(by_summaries.len(), 5);
    assert_eq!(by_summaries.concat(), unbounded.items);
    // A filter the summaries rule out reads nothing and walks the summaries a page at a time.
    let nobody = pages(
        store,
        CallLogQuery {
            service: Some("nobody".into()),
            max_summaries: Some(6),
            ..CallLogQuery::default()
        },
    )
    .await;
    assert_eq!(nobody.len(), 4);
    assert!(nobody.iter().all(Vec::is_empty));
    // A full page ends the walk before the budget does, with the usual cursor.
    let full = store
        .search_call_logs(&CallLogQuery {
            limit: Some(10),
            max_segments: Some(1),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(full.items.len(), 10);
    assert_eq!(full.items[0].request_id, "s19-49");
    let last = &full.items[9];
    assert_eq!(full.next_cursor, Some(format!("{}.{}", last.at, last.id)));
    // A request-id lookup reads only the segments its key names.
    let one = store
        .search_call_logs(&CallLogQuery {
            request_id: Some("s2-3".into()),
            max_segments: Some(1),
            ..CallLogQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    assert_eq!(one.next_cursor, None);
    // Two later segments overlapping each other and `to`: the page reads past its budget
    // through both rather than hand on a cursor after `to`.
    for part in ["x", "y"] {
        let straddling: Vec<CallLogRecord> = (0..10)
            .map(|i| call(60_000 + i * 100, &format!("{part}{i}"), "s", 404))
            .collect();
        insert(store, &straddling).await;
    }
    let before = pages(
        store,
        CallLogQuery {
            to: Some(60_450),
            ..not_found(Some(1), None)
        },
    )
    .await;
    assert_eq!(before[0].len(), 10, "x0 to x4 and y0 to y4");
    assert_eq!(before.concat().len(), 20);
}

fn ids_of(calls: &[CallLogRecord]) -> Vec<&str> {
    calls.iter().map(|c| c.request_id.as_str()).collect()
}

/// Segments that overlap in time (nodes writing at once), some across window boundaries,
/// with many calls at the same millisecond, searched with small budgets: following the
/// cursors gives every matching call once, in order, though a page can only stop where its
/// cursor moves on.
async fn budgeted_pages_over_overlapping_segments_miss_nothing(db: &TestDb) {
    let store = &db.store;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        i64::try_from(seed % n).unwrap()
    };
    let mut all = Vec::new();
    for segment in 0..30 {
        let start = 70_000 + next(30) * 1_000;
        let span = u64::try_from(next(15)).unwrap() + 1;
        let size = next(40) + 1;
        let calls: Vec<CallLogRecord> = (0..size)
            .map(|i| {
                let status = [200, 201, 404, 500][usize::try_from(next(4)).unwrap()];
                let service = ["a", "b"][usize::try_from(next(2)).unwrap()];
                // Steps of 500 ms: ties in time within and across segments.
                call(
                    start + next(span) * 500,
                    &format!("o{segment}-{i}"),
                    service,
                    status,
                )
            })
            .collect();
        insert(store, &calls).await;
        all.extend(calls);
    }
    let queries = [
        (None, None, None, None, 7),
        (Some(4), None, None, None, 3),
        (Some(5), Some("a"), None, None, 50),
        (Some(2), None, Some(75_000), Some(90_000), 1),
        (None, Some("b"), Some(80_000), None, 4),
    ];
    for (status_class, service, from, to, limit) in queries {
        let query = CallLogQuery {
            status_class,
            service: service.map(str::to_owned),
            from,
            to,
            limit: Some(limit),
            ..CallLogQuery::default()
        };
        let mut expected: Vec<(i64, String)> = keys(&all)
            .into_iter()
            .zip(&all)
            .filter(|(_, c)| {
                status_class.is_none_or(|k| c.status / 100 == k)
                    && service.is_none_or(|s| c.service.as_deref() == Some(s))
                    && from.is_none_or(|f| c.at >= f)
                    && to.is_none_or(|t| c.at < t)
            })
            .map(|(k, _)| k)
            .collect();
        expected.sort();
        assert!(!expected.is_empty());
        for (max_segments, max_summaries, max_calls) in [
            (None, None, None),
            (Some(1), None, None),
            (Some(2), None, None),
            (None, Some(3), None),
            (None, None, Some(25)),
        ] {
            let what = format!(
                "{status_class:?} {service:?} {from:?}..{to:?} limit {limit}, budget \
                 {max_segments:?} {max_summaries:?} {max_calls:?}"
            );
            let found = all_pages(
                store,
                CallLogQuery {
                    max_segments,
                    max_summaries,
                    max_calls,
                    ..query.clone()
                },
            )
            .await;
            for pair in found.windows(2) {
                assert!(
                    (pair[0].at, pair[0].id) > (pair[1].at, pair[1].id),
                    "{what}"
                );
            }
            let mut got = keys(&found);
            got.sort();
            assert_eq!(got, expected, "{what}");
        }
    }
}

/// A batch is stored as one segment per 10-second window of arrival, so a call that arrived
/// long before the rest does not stretch their segment back to it.
async fn a_batch_is_split_by_arrival_window(db: &TestDb) {
    let store = &db.store;
    let mut calls: Vec<CallLogRecord> = (0..30)
        .map(|i| call(600_000 + 9_990 + i, &format!("w{i}"), "s", 200))
        .collect();
    // A long request that arrived five minutes earlier, written with them.
    calls.insert(7, call(300_123, "long", "s", 101));
    insert(store, &calls).await;
    let found = every_call(store, 100).await;
    assert_eq!(found.len(), 31);
    let mut segments: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for c in &found {
        segments.entry(c.id >> 14).or_default().push(c.at);
    }
    let mut spans: Vec<(i64, i64, usize)> = segments
        .values()
        .map(|at| {
            (
                *at.iter().min().unwrap(),
                *at.iter().max().unwrap(),
                at.len(),
            )
        })
        .collect();
    spans.sort();
    assert_eq!(
        spans,
        [
            (300_123, 300_123, 1),
            (609_990, 609_999, 10),
            (610_000, 610_019, 20)
        ]
    );
    assert_eq!(found.last().unwrap().request_id, "long");
}
