//! W3C trace context and OTLP span export through the real gateway: the context reaches
//! the upstream with one span per attempt, spans reach a test collector that decodes the
//! OTLP protobuf, sampling is honoured, a failing collector is retried and a stuck one
//! costs requests nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tokio::sync::mpsc;
use turnpike_observe::trace::Tracing;
use turnpike_observe::{CallEvent, CallSink};

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OTLP/HTTP collector: answers each POST with the status `answer` gives for the
/// n-th request (0-based) and hands every decoded span of the accepted ones to a channel.
async fn collector(
    answer: impl Fn(usize) -> u16 + Send + Sync + 'static,
) -> (Mock, mpsc::UnboundedReceiver<Span>, Arc<AtomicUsize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let posts = Arc::new(AtomicUsize::new(0));
    let seen = posts.clone();
    let mock = Mock::start(move |req| {
        let tx = tx.clone();
        let n = seen.fetch_add(1, Ordering::SeqCst);
        let status = answer(n);
        async move {
            assert_eq!(req.uri().path(), "/v1/traces");
            assert_eq!(
                req.headers()["content-type"].to_str().unwrap(),
                "application/x-protobuf"
            );
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let export = ExportTraceServiceRequest::decode(body).expect("a valid OTLP export");
            if status == 200 {
                for rs in export.resource_spans {
                    let resource = rs.resource.unwrap();
                    assert!(resource.attributes.iter().any(|a| a.key == "service.name"
                        && matches!(&a.value.as_ref().unwrap().value, Some(Any::StringValue(s)) if s == "edge")));
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            let _ = tx.send(s);
                        }
                    }
                }
            }
            let mut r = http::Response::new(full(""));
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
            r
        }
    })
    .await;
    (mock, rx, posts)
}

async fn spans(rx: &mut mpsc::UnboundedReceiver<Span>, n: usize) -> Vec<Span> {
    let mut out = Vec::new();
    while out.len() < n {
        let s = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{n} spans within 10 s, got {}", out.len()))
            .unwrap();
        out.push(s);
    }
    out
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match &a.value.as_ref()?.value {
            Some(Any::StringValue(v)) => Some(v.clone()),
            Some(Any::IntValue(v)) => Some(v.to_string()),
            _ => None,
        })
}

/// Keeps every call event (what access logs and the call-log store receive).
#[derive(Default)]
struct Events(Mutex<Vec<Arc<CallEvent>>>);
impl CallSink for Events {
    fn offer(&self, e: &Arc<CallEvent>) {
        self.0.lock().unwrap().push(Arc::clone(e));
    }
}

struct Traced {
    gw: Gw,
    tracing: Arc<Tracing>,
    events: Arc<Events>,
}

/// A gateway with `tracing:` set to `section`, through config parsing and validation.
async fn start(up: std::net::SocketAddr, upstream_extra: &str, section: &str) -> Traced {
    let text = format!(
        "upstreams:\n  - name: up\n    targets: [{{address: \"{up}\"}}]\n{upstream_extra}routes:\n  - {{name: api, paths: [{{prefix: /api}}], upstream: up}}\nobservability:\n  tracing:\n{section}"
    );
    start_text(&text).await
}

async fn start_text(text: &str) -> Traced {
    let cfg = config(text);
    turnpike_model::validate(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let gw = Gw::start(text).await;
    let tracing = Tracing::new(gw.gateway.observer());
    tracing.apply(&cfg.observability.tracing).unwrap();
    let events = Arc::new(Events::default());
    gw.gateway.observer().add(events.clone());
    Traced {
        gw,
        tracing,
        events,
    }
}

fn export(collector: &Mock, extra: &str) -> String {
    format!(
        "    enabled: true\n    service_name: edge\n    otlp:\n      endpoint: \"http://{}/v1/traces\"\n      batch: {{batch_size: 1, max_delay: 10ms{extra}}}\n",
        collector.addr
    )
}

/// The `headers` the echo upstream saw, from its JSON answer.
fn upstream_saw(r: &Reply, name: &str) -> Option<String> {
    r.json()["headers"][name].as_str().map(str::to_owned)
}

async fn last_event(t: &Traced) -> Arc<CallEvent> {
    assert!(
        eventually(Duration::from_secs(10), || async {
            !t.events.0.lock().unwrap().is_empty()
        })
        .await
    );
    t.events.0.lock().unwrap().last().cloned().unwrap()
}

#[tokio::test]
async fn context_reaches_the_upstream_and_spans_reach_the_collector() {
    let up = echo().await;
    let (col, mut rx, _) = collector(|_| 200).await;
    let t = start(up.addr, "", &export(&col, "")).await;
    let r = call(
        &t.gw,
        "GET",
        "/api/items?key=secret",
        &[
            ("traceparent", PARENT),
            ("tracestate", "vendor=abc,other=1"),
            ("x-request-id", "trace-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let sent = upstream_saw(&r, "traceparent").expect("traceparent sent upstream");
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE, "01"));
    assert_ne!(
        parts[2], PARENT_SPAN,
        "the upstream's parent is the gateway's span"
    );
    assert_eq!(
        upstream_saw(&r, "tracestate").as_deref(),
        Some("vendor=abc,other=1")
    );

    let got = spans(&mut rx, 2).await;
    let server = got
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    let client = got
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    assert_eq!(hex(&server.trace_id), TRACE);
    assert_eq!(hex(&client.trace_id), TRACE);
    assert_eq!(hex(&server.parent_span_id), PARENT_SPAN);
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(
        hex(&client.span_id),
        parts[2],
        "the client span is the upstream's parent"
    );
    assert_eq!(server.name, "GET api");
    assert_eq!(server.trace_state, "vendor=abc,other=1");
    assert_eq!(
        attr(server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(server, "turnpike.request_id").as_deref(),
        Some("trace-1")
    );
    assert_eq!(attr(server, "url.path").as_deref(), Some("/api/items"));
    assert!(
        !server
            .attributes
            .iter()
            .any(|a| format!("{a:?}").contains("secret")),
        "query values are not exported"
    );
    assert_eq!(
        attr(client, "server.port").as_deref(),
        Some(up.addr.port().to_string().as_str())
    );
    assert!(server.start_time_unix_nano <= client.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= server.end_time_unix_nano);
    assert!(server.status.is_none() && client.status.is_none());

    // What logs carry: the trace id and the gateway's span id.
    let e = last_event(&t).await;
    assert_eq!(e.trace_id.as_deref(), Some(TRACE));
    assert_eq!(e.span_id.as_deref(), Some(hex(&server.span_id).as_str()));
    // The listener that accepted the call (the test config's default listener).
    let listener = t.gw.gateway.local_addrs()[0].0.clone();
    assert_eq!(e.listener.as_deref(), Some(listener.as_str()));
}

#[tokio::test]
async fn each_attempt_has_its_own_span_and_parent_id() {
    // Whichever target is tried first answers 503 once; the retry gets 200.
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let flaky = || {
        let (hits, seen) = (hits.clone(), seen.clone());
        Mock::start(move |req| {
            let n = hits.fetch_add(1, Ordering::SeqCst);
            seen.lock()
                .unwrap()
                .push(req.headers()["traceparent"].to_str().unwrap().to_owned());
            async move {
                let mut r = http::Response::new(full("ok"));
                if n == 0 {
                    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                r
            }
        })
    };
    let (a, b) = (flaky().await, flaky().await);
    let (col, mut rx, _) = collector(|_| 200).await;
    let text = format!(
        "upstreams:\n  - name: up\n    targets: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n    retries: {{attempts: 1, backoff: 1ms}}\nroutes:\n  - {{name: api, paths: [{{prefix: /api}}], upstream: up}}\nobservability:\n  tracing:\n{}",
        a.addr,
        b.addr,
        export(&col, "")
    );
    let t = start_text(&text).await;
    let r = call(&t.gw, "GET", "/api/retry", &[]).await;
    assert_eq!(r.status, 200);
    let parents = seen.lock().unwrap().clone();
    assert_eq!(parents.len(), 2);
    assert_ne!(parents[0], parents[1]);

    let got = spans(&mut rx, 3).await;
    let server = got
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert!(server.parent_span_id.is_empty(), "a new trace starts here");
    let mut clients: Vec<&Span> = got
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    clients.sort_by_key(|s| s.start_time_unix_nano);
    for (c, sent) in clients.iter().zip(&parents) {
        assert_eq!(c.trace_id, server.trace_id);
        assert_eq!(c.parent_span_id, server.span_id);
        assert_eq!(
            sent,
            &format!("00-{}-{}-01", hex(&c.trace_id), hex(&c.span_id))
        );
    }
    assert_eq!(
        attr(clients[0], "http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(clients[0].status.as_ref().map(|s| s.code), Some(2), "error");
    assert!(clients[0].end_time_unix_nano <= clients[1].start_time_unix_nano);
    assert_eq!(
        attr(clients[1], "http.request.resend_count").as_deref(),
        Some("1")
    );
    assert!(clients[1].status.is_none());
}

#[tokio::test]
async fn ratio_zero_propagates_but_records_only_sampled_parents() {
    let up = echo().await;
    let (col, mut rx, _) = collector(|_| 200).await;
    let t = start(
        up.addr,
        "",
        &format!("{}    sample_ratio: 0.0\n", export(&col, "")),
    )
    .await;
    // No parent: a trace starts here, unsampled, and still goes upstream.
    let r = call(&t.gw, "GET", "/api/a", &[]).await;
    let sent = upstream_saw(&r, "traceparent").unwrap();
    let p = turnpike_observe::trace::context::parse_traceparent(sent.as_bytes()).unwrap();
    assert!(!p.sampled());
    // A caller that sampled is followed (parent-based).
    let r = call(&t.gw, "GET", "/api/b", &[("traceparent", PARENT)]).await;
    assert!(upstream_saw(&r, "traceparent").unwrap().ends_with("-01"));
    let got = spans(&mut rx, 2).await;
    assert!(
        got.iter().all(|s| hex(&s.trace_id) == TRACE),
        "only the sampled trace"
    );
    // Nothing else arrives: the event of the unsampled call was not exported.
    let ex = t.tracing.exporter().unwrap();
    assert!(eventually(Duration::from_secs(5), || async { ex.stats().sent == 2 }).await);
    assert!(rx.try_recv().is_err());
    assert_eq!(ex.stats().dropped, 0);
}

#[tokio::test]
async fn tracing_off_forwards_context_untouched_and_logs_the_trace_id() {
    let up = echo().await;
    let gw = Gw::start(&yaml(up.addr, "")).await;
    let events = Arc::new(Events::default());
    gw.gateway.observer().add(events.clone());
    let r = call(
        &gw,
        "GET",
        "/api/x",
        &[("traceparent", PARENT), ("tracestate", "Not=Valid=")],
    )
    .await;
    assert_eq!(upstream_saw(&r, "traceparent").as_deref(), Some(PARENT));
    assert_eq!(
        upstream_saw(&r, "tracestate").as_deref(),
        Some("Not=Valid=")
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            !events.0.lock().unwrap().is_empty()
        })
        .await
    );
    let e = events.0.lock().unwrap()[0].clone();
    assert_eq!(e.trace_id.as_deref(), Some(TRACE));
    assert!(e.span_id.is_none() && e.trace.is_none());
}

#[tokio::test]
async fn an_invalid_parent_starts_a_new_trace_and_drops_its_tracestate() {
    let up = echo().await;
    let t = start(up.addr, "", "    enabled: true\n").await;
    let bad = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    let r = call(
        &t.gw,
        "GET",
        "/api/x",
        &[("traceparent", bad), ("tracestate", "vendor=abc")],
    )
    .await;
    let sent = upstream_saw(&r, "traceparent").unwrap();
    let p = turnpike_observe::trace::context::parse_traceparent(sent.as_bytes()).unwrap();
    assert_ne!(hex(&p.trace_id), TRACE.to_owned());
    assert!(p.sampled(), "ratio 1.0 samples new traces");
    assert_eq!(upstream_saw(&r, "tracestate"), None);
    let e = last_event(&t).await;
    assert_eq!(e.trace_id.as_deref(), Some(hex(&p.trace_id).as_str()));
    // Reloading tracing off stops taking part: the context then passes untouched.
    let off: turnpike_model::observe::TracingConfig = Default::default();
    t.tracing.apply(&off).unwrap();
    let r = call(&t.gw, "GET", "/api/x", &[("traceparent", bad)]).await;
    assert_eq!(upstream_saw(&r, "traceparent").as_deref(), Some(bad));
}

#[tokio::test]
async fn a_failing_collector_is_retried_and_a_refusing_one_is_counted() {
    let up = echo().await;
    let (col, mut rx, posts) = collector(|n| if n == 0 { 503 } else { 200 }).await;
    let t = start(
        up.addr,
        "",
        &export(&col, ", retry_backoff: 1ms, max_retries: 2"),
    )
    .await;
    call(&t.gw, "GET", "/api/r", &[]).await;
    let got = spans(&mut rx, 2).await;
    assert_eq!(got[0].trace_id, got[1].trace_id);
    let ex = t.tracing.exporter().unwrap();
    assert!(eventually(Duration::from_secs(5), || async { ex.stats().sent == 2 }).await);
    assert_eq!(ex.retries(), 1);
    assert_eq!(posts.load(Ordering::SeqCst), 2);

    // 400 is not retryable: the spans are counted as failed at once.
    let (bad, _rx, bad_posts) = collector(|_| 400).await;
    let t = start(
        up.addr,
        "",
        &export(&bad, ", retry_backoff: 1ms, max_retries: 5"),
    )
    .await;
    call(&t.gw, "GET", "/api/r", &[]).await;
    let ex = t.tracing.exporter().unwrap();
    assert!(eventually(Duration::from_secs(5), || async { ex.stats().failed == 2 }).await);
    assert_eq!(bad_posts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stuck_collector_costs_requests_nothing_and_drops_are_counted() {
    let up = echo().await;
    let (silent_addr, mut hold_rx) = silent_server().await;
    let baseline_gw = Gw::start(&yaml(up.addr, "")).await;
    timed(&baseline_gw, 5).await;
    let baseline = timed(&baseline_gw, 30).await;

    let t = start(
        up.addr,
        "",
        &format!(
            "    enabled: true\n    otlp:\n      endpoint: \"http://{silent_addr}/v1/traces\"\n      queue_size: 4\n      batch: {{batch_size: 1, timeout: 60s, max_retries: 0}}\n"
        ),
    )
    .await;
    timed(&t.gw, 5).await;
    let with_stuck = timed(&t.gw, 30).await;
    let _held = tokio::time::timeout(Duration::from_secs(10), hold_rx.recv())
        .await
        .expect("the exporter reached the collector")
        .unwrap();
    let ex = t.tracing.exporter().unwrap();
    let stats = ex.stats();
    assert_eq!(stats.sent, 0);
    // 35 calls: at most one being sent, four queued, the rest dropped.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let s = ex.stats();
            s.queued == 4 && (30..=31).contains(&s.dropped)
        })
        .await,
        "{:?}",
        ex.stats()
    );
    assert!(
        with_stuck < baseline * 3 + Duration::from_millis(500),
        "with a stuck collector {with_stuck:?}, without {baseline:?}"
    );
    // The drops are visible as metrics.
    let text = t.gw.gateway.status().metrics().render().unwrap();
    let dropped = turnpike_observe::metrics::sample(
        &text,
        "turnpike_observability_sink_records_total",
        &[
            ("sink", "otlp-traces"),
            ("kind", "otlp_traces"),
            ("outcome", "dropped"),
        ],
    );
    assert_eq!(dropped, Some(ex.stats().dropped as f64), "{text}");
    // Shutdown gives up at the exporter's deadline instead of hanging.
    tokio::time::timeout(
        Duration::from_secs(10),
        ex.shutdown(Duration::from_millis(200)),
    )
    .await
    .expect("shutdown is bounded");
}
