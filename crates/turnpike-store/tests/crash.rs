//! Crash safety: a writer process is killed with SIGKILL in the middle of a burst of writes;
//! every write it acknowledged must be in the store afterwards, and the store consistent.
//!
//! The writer is this same test binary, re-executed to run only `crash_writer_child`, which
//! does nothing unless `TURNPIKE_STORE_CRASH_WRITER` names a store. The parent synchronises
//! on the writer's output (one line per acknowledged commit), never on time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::TestDb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::timeout;
use turnpike_store::{AuditQuery, Backend, NewObject, Store};

const WRITER_ENV: &str = "TURNPIKE_STORE_CRASH_WRITER";
const ACK: &str = "ACK ";
/// Acknowledged writes to wait for before killing the writer.
const ACKS_BEFORE_KILL: usize = 200;
const KIND: &str = "crash";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_kill_during_writes() {
    kill_during_writes(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_kill_during_writes() {
    kill_during_writes(Backend::Postgres).await;
}

/// The writer. Passes trivially when run as an ordinary test.
#[tokio::test]
async fn crash_writer_child() {
    let Ok(url) = std::env::var(WRITER_ENV) else {
        return;
    };
    let store = Store::open(&url).await.expect("writer: open store");
    let mut stdout = std::io::stdout();
    // Bounded, so a writer whose parent died without killing it still ends.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let mut tx = store.begin("crash-writer").await.expect("writer: begin");
        let object = tx
            .create(NewObject {
                kind: KIND.into(),
                name: format!("w{n}-{}", uuid::Uuid::now_v7().simple()),
                spec: serde_json::json!({ "n": n }),
                ..NewObject::default()
            })
            .await
            .expect("writer: create");
        tx.commit().await.expect("writer: commit");
        // Only after commit returned: this line is the acknowledgement.
        if writeln!(stdout, "{ACK}{}", object.id)
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return; // The parent is gone.
        }
    }
}

/// The id an acknowledgement line carries. libtest prints `test crash_writer_child ... `
/// without a newline before the test runs, so the first acknowledgement shares its line.
fn ack_of(line: &str) -> Option<&str> {
    line.split_once(ACK).map(|(_, id)| id)
}

async fn kill_during_writes(backend: Backend) {
    let db = TestDb::open(backend).await;
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = tokio::process::Command::new(exe)
        .args([
            "crash_writer_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WRITER_ENV, &db.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn writer");
    let mut lines = BufReader::new(child.stdout.take().expect("writer stdout")).lines();

    let mut acked = Vec::new();
    let reading = timeout(Duration::from_secs(60), async {
        while acked.len() < ACKS_BEFORE_KILL {
            let line = lines.next_line().await.expect("read writer output");
            let Some(line) = line else {
                panic!(
                    "the writer exited after {} acks; see its stderr above",
                    acked.len()
                );
            };
            if let Some(id) = ack_of(&line) {
                acked.push(id.to_owned());
            }
        }
    });
    reading
        .await
        .expect("the writer did not acknowledge enough writes within 60s");

    // SIGKILL, mid-burst: the writer is somewhere inside a transaction or a commit.
    child.kill().await.expect("kill writer");
    // Lines written before the kill are acknowledgements too.
    while let Some(line) = lines.next_line().await.expect("drain writer output") {
        if let Some(id) = ack_of(&line) {
            acked.push(id.to_owned());
        }
    }

    let store = db.open_another().await;
    let stored: HashSet<String> = store
        .list_all(KIND)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.id)
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    // At most the one in flight at the kill may have committed without being acknowledged.
    assert!(
        stored.len() <= acked.len() + 1,
        "{} stored, {} acked",
        stored.len(),
        acked.len()
    );

    // Each writer transaction made one object, one audit entry and one version bump.
    let version = store.current_version().await.unwrap();
    assert_eq!(version, i64::try_from(stored.len()).unwrap());
    let mut audited = HashSet::new();
    let mut query = AuditQuery {
        kind: Some(KIND.into()),
        limit: Some(500),
        ..Default::default()
    };
    loop {
        let page = store.audit(&query).await.unwrap();
        for entry in page.items {
            assert_eq!(entry.action, "create");
            assert!(
                audited.insert(entry.object_id),
                "one audit entry per object"
            );
        }
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    assert_eq!(audited, stored);

    if backend == Backend::Sqlite {
        let check = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        let (result,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&check)
            .await
            .unwrap();
        assert_eq!(result, "ok");
        check.close().await;
    }

    // The killed writer's locks are gone: writing works again.
    let mut tx = timeout(Duration::from_secs(10), store.begin("after-crash"))
        .await
        .expect("the writer lock is still held after the crash")
        .unwrap();
    tx.create(NewObject {
        kind: KIND.into(),
        name: "after".into(),
        ..NewObject::default()
    })
    .await
    .unwrap();
    assert_eq!(tx.commit().await.unwrap(), version + 1);
    store.close().await;
    db.close().await;
}
