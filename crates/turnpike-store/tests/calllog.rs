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
    prune_trims_a_straddling_segment_and_keeps_ids,
    large_batches_are_split_into_segments,
    calls_of_earlier_versions_are_moved_into_segments,
    hundreds_of_segments_are_walked_pruned_and_capped,
    a_corrupt_segment_is_an_error,
    two_nodes_move_and_prune_at_once,
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
async fn all_pages(store: &Store, mut query: CallLogQuery) -> Vec<CallLogRecord> {
    let mut out = Vec::new();
    loop {
        let page = store.search_call_logs(&query).await.unwrap();
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => return out,
        }
    }
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
