//! gRPC translation through the gateway: plain HTTP/JSON clients (`grpc_transcode`) and
//! gRPC-Web clients (`grpc_web`) in front of a real tonic server over h2c.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::*;
use futures_util::Stream;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

mod pb {
    tonic::include_proto!("library.v1");
}

use pb::library_server::{Library, LibraryServer};
use pb::{
    Book, CreateBookRequest, Genre, GetBookRequest, ListBooksRequest, ListBooksResponse,
    WatchRequest,
};

/// The server side: answers from the request, so each field's trip is visible.
struct Svc {
    /// `Watch` on shelf `gated` sends its first book, then waits for this before the rest:
    /// the first line must reach the client while the stream is still open.
    gate: Arc<Notify>,
}

type BookStream = Pin<Box<dyn Stream<Item = Result<Book, Status>> + Send>>;

#[tonic::async_trait]
impl Library for Svc {
    async fn get_book(
        &self,
        req: GrpcRequest<GetBookRequest>,
    ) -> Result<GrpcResponse<Book>, Status> {
        let caller = req
            .metadata()
            .get("x-caller")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let name = req.into_inner().name;
        if name.ends_with("/missing") {
            return Err(Status::not_found(format!("no book {name} — café")));
        }
        let mut resp = GrpcResponse::new(Book {
            name: name.clone(),
            title: format!("Title of {name}"),
            pages: 9_007_199_254_740_993,
            genre: Genre::Science as i32,
            tags: vec![],
            author: None,
        });
        resp.metadata_mut()
            .insert("x-seen-caller", caller.parse().unwrap());
        Ok(resp)
    }

    async fn list_books(
        &self,
        req: GrpcRequest<ListBooksRequest>,
    ) -> Result<GrpcResponse<ListBooksResponse>, Status> {
        let r = req.into_inner();
        let books = (0..r.page_size)
            .map(|i| Book {
                name: format!("shelves/{}/books/{i}", r.shelf),
                title: r
                    .author
                    .as_ref()
                    .map(|a| a.display_name.clone())
                    .unwrap_or_default(),
                pages: 0,
                genre: r.genre,
                tags: r.tags.clone(),
                author: None,
            })
            .collect();
        Ok(GrpcResponse::new(ListBooksResponse { books }))
    }

    async fn create_book(
        &self,
        req: GrpcRequest<CreateBookRequest>,
    ) -> Result<GrpcResponse<Book>, Status> {
        let r = req.into_inner();
        let mut book = r.book.unwrap_or_default();
        book.name = format!("shelves/{}/books/{}", r.shelf, book.title);
        Ok(GrpcResponse::new(book))
    }

    type WatchStream = BookStream;

    async fn watch(
        &self,
        req: GrpcRequest<WatchRequest>,
    ) -> Result<GrpcResponse<BookStream>, Status> {
        let r = req.into_inner();
        if r.shelf == "none" {
            return Err(Status::permission_denied("not your shelf"));
        }
        let gate = (r.shelf == "gated").then(|| Arc::clone(&self.gate));
        let stream = async_stream(r, gate);
        Ok(GrpcResponse::new(Box::pin(stream)))
    }

    async fn ping(
        &self,
        req: GrpcRequest<GetBookRequest>,
    ) -> Result<GrpcResponse<GetBookRequest>, Status> {
        let r = req.into_inner();
        Ok(GrpcResponse::new(GetBookRequest {
            name: format!("pong {}", r.name),
        }))
    }
}

/// The books of a `Watch`, with the gate after the first and an error at the end if asked.
fn async_stream(
    r: WatchRequest,
    gate: Option<Arc<Notify>>,
) -> impl Stream<Item = Result<Book, Status>> + Send {
    futures_util::stream::unfold((0, r, gate), |(i, r, gate)| async move {
        if i > r.count {
            return None;
        }
        if i == r.count {
            if r.fail {
                return Some((Err(Status::aborted("shelf closed")), (i + 1, r, gate)));
            }
            return None;
        }
        if i == 1
            && let Some(g) = &gate
        {
            g.notified().await;
        }
        let book = Book {
            name: format!("shelves/{}/books/{i}", r.shelf),
            title: format!("#{i}"),
            ..Default::default()
        };
        Some((Ok(book), (i + 1, r, gate)))
    })
}

async fn library(gate: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(LibraryServer::new(Svc { gate }), incoming),
    );
    addr
}

fn proto_dir() -> String {
    format!("{}/proto", env!("CARGO_MANIFEST_DIR"))
}

/// A gateway whose catch-all route transcodes to the library server. `policy` is the
/// `grpc_transcode` config, indented by 6 spaces.
async fn gateway(up: SocketAddr, policy: &str, extra: &str) -> Gw {
    Gw::start(&format!(
        r#"{routes}
policies:
  - name: tc
    type: grpc_transcode
    scope: route
    target: all
    config:
{policy}
{extra}"#,
        routes = one_route(up, "    http2: true", "")
    ))
    .await
}

fn from_files() -> String {
    format!(
        "      proto_files: [\"{dir}/library.proto\"]\n      import_paths: [\"{dir}\"]\n      \
         methods:\n        - {{grpc: library.v1.Library/Ping, method: GET, path: \"/v1/ping/{{name}}\"}}\n        \
         - {{grpc: library.v1.Library/ListBooks, method: GET, path: \"/v2/by/{{author.display_name}}/{{order_by}}\"}}",
        dir = proto_dir()
    )
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The JSON error's message.
    fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {:?}", self.body))
            .to_owned()
    }
}

fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn open(
    gw: &Gw,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> http::Response<Incoming> {
    let mut r = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gw.addr));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let req = r.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    within("request", client().request(req)).await.unwrap()
}

async fn call(gw: &Gw, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let resp = open(gw, method, path, headers, body).await;
    let (parts, body) = resp.into_parts();
    let body = within("body", body.collect()).await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

#[tokio::test]
async fn unary_methods_follow_their_http_annotations() {
    let up = library(Arc::default()).await;
    let gw = gateway(up, &from_files(), "").await;

    // Path variables (a multi-segment one), request metadata from headers, response metadata
    // to headers; int64 written as a string and enums by name (the proto3 JSON mapping).
    let r = call(
        &gw,
        "GET",
        "/v1/shelves/s1/books/b%20one",
        &[("x-caller", "ann")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-seen-caller"), Some("ann"));
    assert!(r.header("grpc-status").is_none());
    assert_eq!(
        r.json(),
        serde_json::json!({
            "name": "shelves/s1/books/b one",
            "title": "Title of shelves/s1/books/b one",
            "pages": "9007199254740993",
            "genre": "SCIENCE"
        })
    );

    // Query parameters fill the fields the path does not: repeated, enum, nested; the
    // response is the `books` field alone (`response_body`).
    let r = call(
        &gw,
        "GET",
        "/v1/shelves/s2/books?page_size=2&genre=FICTION&tags=a&tags=b&author.display_name=Ada",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.json(),
        serde_json::json!([
            {"name": "shelves/s2/books/0", "title": "Ada", "genre": "FICTION", "tags": ["a", "b"]},
            {"name": "shelves/s2/books/1", "title": "Ada", "genre": "FICTION", "tags": ["a", "b"]}
        ])
    );

    // An empty list is `[]`, not left out.
    let r = call(&gw, "GET", "/v1/shelves/s2/books?page_size=0", &[], "").await;
    assert_eq!(r.json(), serde_json::json!([]));

    // A query parameter cannot override what the path binds, by either of its names, nor
    // set a oneof sibling of it.
    let r = call(
        &gw,
        "GET",
        "/v2/by/Ada/title?page_size=1&author.displayName=Eve&author.display_name=Eve",
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["books"][0]["title"], "Ada");
    let r = call(&gw, "GET", "/v2/by/Ada/title?newestFirst=true", &[], "").await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.message().contains("order_by"));

    // `body: "book"`: the JSON body is that field; the shelf comes from the path.
    let r = call(
        &gw,
        "POST",
        "/v1/shelves/s3/books",
        &[("content-type", "application/json")],
        r#"{"title": "dune", "pages": 412, "author": {"displayName": "Frank"}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.json(),
        serde_json::json!({
            "name": "shelves/s3/books/dune", "title": "dune", "pages": "412",
            "author": {"displayName": "Frank"}
        })
    );

    // An additional binding with `body: "*"` and a custom verb.
    let r = call(
        &gw,
        "PUT",
        "/v1/shelves/s4/books:create",
        &[],
        r#"{"book": {"title": "emma"}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["name"], "shelves/s4/books/emma");

    // HEAD is answered as GET, without the body.
    let r = call(&gw, "HEAD", "/v1/shelves/s1/books/b1", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.body.is_empty());

    // The explicit mapping of a method without annotation.
    let r = call(&gw, "GET", "/v1/ping/x", &[], "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json(), serde_json::json!({"name": "pong x"}));
}

#[tokio::test]
async fn grpc_errors_and_bad_requests_are_json_errors() {
    let up = library(Arc::default()).await;
    let gw = gateway(up, &from_files(), "").await;

    // A gRPC status becomes its HTTP status and a JSON error with the decoded message.
    let r = call(&gw, "GET", "/v1/shelves/s1/books/missing", &[], "").await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let j = r.json();
    assert_eq!(j["error"]["code"], "grpc_not_found");
    assert_eq!(j["error"]["grpc_status"], 5);
    assert_eq!(
        j["error"]["message"],
        "no book shelves/s1/books/missing — café"
    );
    assert_eq!(
        j["error"]["request_id"].as_str(),
        r.header("x-request-id"),
        "the error names the request"
    );

    // Fields the message does not have are refused, naming them.
    let r = call(
        &gw,
        "POST",
        "/v1/shelves/s1/books",
        &[],
        r#"{"titel": "x"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "grpc_request_invalid");
    assert!(r.message().contains("titel"));
    let r = call(&gw, "GET", "/v1/shelves/s1/books?pagesize=1", &[], "").await;
    assert_eq!(r.status, 400);
    assert!(r.message().contains("pagesize"));
    // A value of the wrong type.
    let r = call(&gw, "GET", "/v1/shelves/s1/books?page_size=many", &[], "").await;
    assert_eq!(r.status, 400);
    assert!(r.message().contains("page_size"));
    // Not JSON.
    let r = call(&gw, "POST", "/v1/shelves/s1/books", &[], "{").await;
    assert_eq!(r.status, 400);
    let r = call(
        &gw,
        "POST",
        "/v1/shelves/s1/books",
        &[("content-type", "text/plain")],
        "{}",
    )
    .await;
    assert_eq!(r.status, 415);
    // A body where the method takes none.
    let r = call(&gw, "GET", "/v1/ping/x", &[], "{}").await;
    assert_eq!(r.status, 400);

    // Unmapped path: 404; mapped path, other method: 405 naming the allowed one.
    let r = call(&gw, "GET", "/v2/nothing", &[], "").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "route_not_found");
    let r = call(&gw, "DELETE", "/v1/shelves/s1/books", &[], "").await;
    assert_eq!(r.status, 405);
    assert!(r.message().contains("GET"));
}

#[tokio::test]
async fn server_streams_arrive_as_json_lines_while_open() {
    let gate = Arc::new(Notify::new());
    let up = library(Arc::clone(&gate)).await;
    let gw = gateway(up, &from_files(), "").await;

    let resp = open(&gw, "GET", "/v1/shelves/gated:watch?count=3", &[], "").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/x-ndjson"
    );
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    let mut buf = BytesMut::new();
    let mut opened = false;
    while let Some(frame) = within("stream frame", body.frame()).await {
        let frame = frame.unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(nl + 1);
            seen.push(serde_json::from_slice::<serde_json::Value>(&line[..nl]).unwrap());
            if !opened {
                // The first book reached the client before the server sent the second.
                opened = true;
                gate.notify_one();
            }
        }
    }
    assert!(buf.is_empty());
    let titles: Vec<_> = seen.iter().map(|b| b["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["#0", "#1", "#2"]);
}

#[tokio::test]
async fn server_streams_as_events_end_with_the_status() {
    let up = library(Arc::default()).await;
    let gw = gateway(up, &from_files(), "").await;

    // `Accept: text/event-stream` chooses SSE; an error after the messages is the last event.
    let r = call(
        &gw,
        "GET",
        "/v1/shelves/s:watch?count=2&fail=true",
        &[("accept", "text/event-stream")],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = std::str::from_utf8(&r.body).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{text}");
    assert!(
        events[0].starts_with("data: {\"name\":\"shelves/s/books/0\""),
        "{text}"
    );
    assert!(
        events[1].starts_with("data: {\"name\":\"shelves/s/books/1\""),
        "{text}"
    );
    assert!(events[2].starts_with("event: error\ndata: "), "{text}");
    let err: serde_json::Value =
        serde_json::from_str(events[2].split_once("data: ").unwrap().1).unwrap();
    assert_eq!(err["error"]["code"], "grpc_aborted");
    assert_eq!(err["error"]["message"], "shelf closed");
    assert_eq!(
        err["error"]["request_id"].as_str(),
        r.header("x-request-id")
    );

    // An error before any message (trailers-only) is the HTTP status itself.
    let r = call(&gw, "GET", "/v1/shelves/none:watch?count=2", &[], "").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "grpc_permission_denied");

    // JSON lines as well: the error is the last line.
    let r = call(&gw, "GET", "/v1/shelves/s:watch?count=1&fail=true", &[], "").await;
    let lines: Vec<&str> = std::str::from_utf8(&r.body).unwrap().lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[1].contains("grpc_aborted"));
}

#[tokio::test]
async fn inline_sources_use_the_gateways_annotation_schema() {
    // No import path: `google/api/annotations.proto` is the gateway's own; JSON options.
    let src = std::fs::read_to_string(format!("{}/library.proto", proto_dir())).unwrap();
    let indented: String = src.lines().map(|l| format!("          {l}\n")).collect();
    let policy = format!(
        "      proto_sources:\n        library/v1/library.proto: |\n{indented}      \
         services: [library.v1.Library]\n      \
         json: {{proto_names: true, emit_defaults: true, enums_as_numbers: true}}"
    );
    let up = library(Arc::default()).await;
    let gw = gateway(up, &policy, "").await;
    let r = call(&gw, "GET", "/v1/shelves/s1/books/b1", &[], "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let j = r.json();
    assert_eq!(j["genre"], 2);
    assert_eq!(j["tags"], serde_json::json!([]));
    assert!(j.get("author").is_none() || j["author"].is_null());
    let r = call(
        &gw,
        "POST",
        "/v1/shelves/s3/books",
        &[],
        r#"{"title": "x", "author": {"display_name": "Frank"}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["author"]["display_name"], "Frank");
}

#[tokio::test]
async fn bad_proto_configs_are_refused_naming_the_problem() {
    let cfg = |policy: &str| {
        format!(
            r#"{routes}
policies:
  - name: tc
    type: grpc_transcode
    scope: route
    target: all
    config:
{policy}"#,
            routes = one_route("127.0.0.1:1".parse().unwrap(), "    http2: true", "")
        )
    };
    for (policy, want) in [
        (
            "      proto_sources:\n        a.proto: \"syntax = \\\"proto3\\\"; message {\""
                .to_owned(),
            "a.proto",
        ),
        (
            format!("      proto_files: [\"{}/nope.proto\"]", proto_dir()),
            "nope.proto",
        ),
        (
            format!(
                "      proto_files: [\"{}/library.proto\"]\n      methods:\n        - {{grpc: library.v1.Library/Nope, path: /x}}",
                proto_dir()
            ),
            "library.v1.Library/Nope",
        ),
        (
            format!(
                "      proto_files: [\"{}/library.proto\"]\n      methods:\n        - {{grpc: library.v1.Library/ListBooks, path: \"/x/{{author}}\"}}",
                proto_dir()
            ),
            "well-known",
        ),
        (
            format!(
                "      proto_files: [\"{}/library.proto\"]\n      methods:\n        - {{grpc: library.v1.Library/Ping, path: \"/x/{{nope}}\"}}",
                proto_dir()
            ),
            "nope",
        ),
    ] {
        let yaml = cfg(&policy);
        let c = config(&yaml);
        let err = match start_err(&c).await {
            Ok(()) => panic!("accepted: {policy}"),
            Err(e) => e,
        };
        assert!(err.contains(want), "{policy}: {err}");
    }
}

/// Starts a gateway, for configurations that must be refused.
async fn start_err(c: &turnpike_model::Config) -> Result<(), String> {
    turnpike_proxy::gateway::Gateway::start(c)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// gRPC-Web frames: a message frame, and the trailer frame parsed back into headers.
fn web_frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = BytesMut::new();
    out.put_u8(0);
    out.put_u32(body.len() as u32);
    out.extend_from_slice(&body);
    out.freeze()
}

fn web_frames(mut body: Bytes) -> (Vec<Bytes>, String) {
    let mut messages = Vec::new();
    let mut trailers = String::new();
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body.advance(5);
        let data = body.split_to(len);
        if flag & 0x80 != 0 {
            trailers = String::from_utf8(data.to_vec()).unwrap();
        } else {
            messages.push(data);
        }
    }
    assert!(body.is_empty());
    (messages, trailers)
}

#[tokio::test]
async fn grpc_web_clients_reach_the_grpc_server() {
    let up = library(Arc::default()).await;
    let gw = Gw::start(&format!(
        r#"{routes}
policies:
  - {{name: web, type: grpc_web, scope: route, target: all, config: {{}}}}
"#,
        routes = one_route(up, "    http2: true", "")
    ))
    .await;
    use base64::Engine as _;

    // Binary, over HTTP/1.1: the answer's messages, then the trailers as a frame.
    let req = GetBookRequest {
        name: "shelves/w/books/1".into(),
    };
    let resp = open_bytes(
        &gw,
        "/library.v1.Library/GetBook",
        "application/grpc-web+proto",
        web_frame(&req),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("application/grpc-web+proto")
    );
    let (msgs, trailers) = web_frames(resp.body.clone());
    assert_eq!(msgs.len(), 1);
    let book = Book::decode(msgs[0].clone()).unwrap();
    assert_eq!(book.title, "Title of shelves/w/books/1");
    assert!(trailers.contains("grpc-status: 0\r\n"), "{trailers:?}");

    // Text (base64) with a server stream ending in an error.
    let req = WatchRequest {
        shelf: "w".into(),
        count: 2,
        fail: true,
    };
    let text = base64::engine::general_purpose::STANDARD.encode(web_frame(&req));
    let resp = open_bytes(
        &gw,
        "/library.v1.Library/Watch",
        "application/grpc-web-text",
        Bytes::from(text),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type"),
        Some("application/grpc-web-text+proto")
    );
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&resp.body)
        .expect("one base64 text, padded only at its end");
    let (msgs, trailers) = web_frames(raw.into());
    assert_eq!(msgs.len(), 2);
    assert_eq!(Book::decode(msgs[1].clone()).unwrap().title, "#1");
    assert!(trailers.contains("grpc-status: 10\r\n"), "{trailers:?}");
    // Percent-encoded as the server sent it (gRPC-Web clients decode it).
    assert!(
        trailers.contains("grpc-message: shelf%20closed\r\n"),
        "{trailers:?}"
    );

    // An error before any message: trailers-only, in the headers.
    let req = GetBookRequest {
        name: "shelves/w/books/missing".into(),
    };
    let resp = open_bytes(
        &gw,
        "/library.v1.Library/GetBook",
        "application/grpc-web",
        web_frame(&req),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("grpc-status"), Some("5"));

    // With grpc_transcode on the route, only the methods it exposes pass (`native_grpc:
    // mapped`, the default).
    let gw = Gw::start(&format!(
        r#"{routes}
policies:
  - {{name: web, type: grpc_web, scope: route, target: all, config: {{}}}}
  - name: tc
    type: grpc_transcode
    scope: route
    target: all
    config:
      proto_files: ["{dir}/library.proto"]
      use_annotations: false
      methods: [{{grpc: library.v1.Library/Ping, path: /ping, body: "*"}}]
"#,
        routes = one_route(up, "    http2: true", ""),
        dir = proto_dir()
    ))
    .await;
    let ping = GetBookRequest { name: "p".into() };
    let resp = open_bytes(
        &gw,
        "/library.v1.Library/Ping",
        "application/grpc-web",
        web_frame(&ping),
    )
    .await;
    assert_eq!(resp.status, 200);
    let (msgs, _) = web_frames(resp.body.clone());
    assert_eq!(
        GetBookRequest::decode(msgs[0].clone()).unwrap().name,
        "pong p"
    );
    let resp = open_bytes(
        &gw,
        "/library.v1.Library/GetBook",
        "application/grpc-web",
        web_frame(&ping),
    )
    .await;
    // Refused as gRPC-Web: trailers-only, UNIMPLEMENTED.
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("grpc-status"), Some("12"));
    assert_eq!(
        resp.header("content-type"),
        Some("application/grpc-web+proto")
    );
}

async fn open_bytes(gw: &Gw, path: &str, ct: &str, body: Bytes) -> Reply {
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", gw.addr))
        .header("content-type", ct)
        .header("x-grpc-web", "1")
        .body(Full::new(body))
        .unwrap();
    let resp = within("grpc-web call", client().request(req))
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = within("body", body.collect()).await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

#[tokio::test]
async fn the_upstream_gets_a_grpc_call_and_non_grpc_answers_are_errors() {
    let busy = Upstream::start(|s| {
        if s.path_and_query.contains("Ping") {
            status(StatusCode::SERVICE_UNAVAILABLE, "busy")
        } else {
            status(StatusCode::OK, "plain text")
        }
    })
    .await;
    let gw = gateway(busy.addr, &from_files(), "").await;

    let r = call(
        &gw,
        "GET",
        "/v1/ping/x?name=other",
        &[("x-caller", "c")],
        "",
    )
    .await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.json()["error"]["code"], "grpc_unavailable");

    // What the upstream saw: a gRPC call, its message framed, no query (the path binds
    // `name`: the parameter is ignored).
    let seen = busy.seen();
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.path_and_query, "/library.v1.Library/Ping");
    assert_eq!(s.version, http::Version::HTTP_2);
    assert_eq!(s.header("content-type"), Some("application/grpc"));
    assert_eq!(s.header("te"), Some("trailers"));
    assert_eq!(s.header("x-caller"), Some("c"));
    assert_eq!(s.body[0], 0);
    let len = u32::from_be_bytes([s.body[1], s.body[2], s.body[3], s.body[4]]) as usize;
    assert_eq!(len, s.body.len() - 5);
    let msg = GetBookRequest::decode(&s.body[5..]).unwrap();
    assert_eq!(msg.name, "x");

    // A 200 that is not gRPC.
    let r = call(&gw, "GET", "/v1/shelves/s/books/b", &[], "").await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(r.json()["error"]["code"], "grpc_response_invalid");
}
