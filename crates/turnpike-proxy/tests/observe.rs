//! The call event every request leaves behind, as a sink registered on the gateway's
//! observer receives it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::sync::mpsc;
use turnpike_observe::{CallEvent, CallSink};

struct Channel(mpsc::UnboundedSender<Arc<CallEvent>>);

impl CallSink for Channel {
    fn offer(&self, event: &Arc<CallEvent>) {
        let _ = self.0.send(Arc::clone(event));
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Arc<CallEvent>>) -> Arc<CallEvent> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("the sink is still registered")
}

#[tokio::test]
async fn each_request_emits_one_event_with_what_happened() {
    let up = echo().await;
    let gw = Gw::start(&yaml(up.addr, "")).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    gw.gateway.observer().add(Arc::new(Channel(tx)));

    let r = call(
        &gw,
        "GET",
        "/api/items?x=1",
        &[("user-agent", "probe/1"), ("x-request-id", "rid-1")],
    )
    .await;
    assert_eq!(r.status, 200);
    let e = next(&mut rx).await;
    assert_eq!(e.request_id, "rid-1");
    assert_eq!(e.method, "GET");
    assert_eq!(e.path, "/api/items");
    assert_eq!(e.query.as_deref(), Some("x=1"));
    assert_eq!(e.route.as_deref(), Some("api"));
    assert_eq!(e.upstream.as_deref(), Some("up"));
    assert_eq!(e.upstream_target, Some(up.addr));
    assert_eq!(e.status, 200);
    assert_eq!(e.attempts, 1);
    assert_eq!(e.user_agent.as_deref(), Some("probe/1"));
    assert_eq!(e.bytes_out, r.body.len() as u64);
    assert!(e.completed);
    assert!(e.upstream_us.is_some());
    assert!(e.duration_us >= e.upstream_us.unwrap());
    assert!(e.error.is_none());

    // Answered by the gateway itself: no route, no upstream, the error code.
    let r = call(&gw, "GET", "/nowhere", &[]).await;
    assert_eq!(r.status, 404);
    let e = next(&mut rx).await;
    assert_eq!(e.status, 404);
    assert_eq!(e.error, Some("route_not_found"));
    assert!(e.route.is_none() && e.upstream.is_none());
    assert_eq!(e.attempts, 0);
    assert_eq!(e.bytes_out, r.body.len() as u64);

    // A HEAD response has no body to poll; the event still comes, once.
    let r = call(&gw, "HEAD", "/api/head", &[]).await;
    assert_eq!(r.status, 200);
    let e = next(&mut rx).await;
    assert_eq!(e.method, "HEAD");
    assert_eq!(e.bytes_out, 0);
    assert!(rx.try_recv().is_err(), "one event per request");
}
