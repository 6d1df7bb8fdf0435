//! The Admin API on a real store (SQLite in a temporary directory, or a fresh PostgreSQL
//! schema), served on 127.0.0.1:0, driven by a real HTTP client. PostgreSQL tests fail, never
//! skip, when the server is unreachable.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use reqwest::{Method, StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use sqlx::{Connection, Executor};
use turnpike_store::Store;

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The error code of a JSON error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or("<no error code>")
    }

    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected response: {:#}",
            self.body
        );
        self
    }

    #[track_caller]
    pub fn expect_error(self, status: u16, code: &str) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected response: {:#}",
            self.body
        );
        assert_eq!(self.code(), code, "{:#}", self.body);
        assert!(
            self.body["error"]["request_id"].is_string(),
            "{:#}",
            self.body
        );
        self
    }
}

pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    /// The bootstrap super admin's token.
    pub admin: String,
    pub store: Store,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn sqlite() -> Self {
        Self::sqlite_with(|s| s).await
    }

    pub async fn sqlite_with(
        configure: impl FnOnce(turnpike_admin::AdminState) -> turnpike_admin::AdminState,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let store = Store::open(&url).await.expect("open SQLite store");
        Self::start(store, Some(dir), None, configure).await
    }

    pub async fn postgres() -> Self {
        let base = std::env::var("TURNPIKE_TEST_PG").unwrap_or_else(|_| DEFAULT_PG.to_owned());
        let schema = format!("tp_admin_{}", uuid::Uuid::now_v7().simple());
        let mut admin = sqlx::PgConnection::connect(&base)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {base} ({e}). These tests need a real server: \
                 run scripts/services.sh, or set TURNPIKE_TEST_PG to a server URL."
                )
            });
        admin
            .execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .expect("create test schema");
        admin.close().await.ok();
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        let store = Store::open(&url).await.expect("open PostgreSQL store");
        Self::start(store, None, Some((base, schema)), |s| s).await
    }

    async fn start(
        store: Store,
        dir: Option<tempfile::TempDir>,
        pg_schema: Option<(String, String)>,
        configure: impl FnOnce(turnpike_admin::AdminState) -> turnpike_admin::AdminState,
    ) -> Self {
        let admin = turnpike_admin::bootstrap(&store)
            .await
            .unwrap()
            .expect("a fresh store bootstraps");
        assert_eq!(turnpike_admin::bootstrap(&store).await.unwrap(), None);
        let app = turnpike_admin::router(configure(turnpike_admin::AdminState::new(store.clone())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base,
            client: reqwest::Client::new(),
            admin,
            store,
            _dir: dir,
            pg_schema,
            task,
        }
    }

    /// Sends a request; `body` is sent as JSON when given.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "non-JSON body for {path}: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(Method::GET, path, Some(token), None, &[]).await
    }
    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(token), Some(&body), &[])
            .await
    }
    pub async fn put(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::PUT, path, Some(token), Some(&body), &[])
            .await
    }
    pub async fn patch(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::PATCH, path, Some(token), Some(&body), &[])
            .await
    }
    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.call(Method::DELETE, path, Some(token), None, &[])
            .await
    }

    /// Creates a team as the super admin.
    pub async fn team(&self, name: &str) {
        self.post("/admin/v1/teams", &self.admin, json!({ "name": name }))
            .await
            .expect(201);
    }

    /// Creates a user (if needed) with `role` in `team`, and returns a token for it.
    pub async fn member(&self, user: &str, team: &str, role: &str) -> String {
        let r = self
            .post("/admin/v1/users", &self.admin, json!({ "name": user }))
            .await;
        assert!(matches!(r.status.as_u16(), 201 | 409), "{:#}", r.body);
        self.post(
            &format!("/admin/v1/teams/{team}/members"),
            &self.admin,
            json!({ "name": user, "role": role }),
        )
        .await
        .expect(201);
        self.token(user).await
    }

    /// A new token for a user.
    pub async fn token(&self, user: &str) -> String {
        let r = self
            .post(
                &format!("/admin/v1/users/{user}/tokens"),
                &self.admin,
                json!({ "name": "test" }),
            )
            .await
            .expect(201);
        r.body["secret"].as_str().unwrap().to_owned()
    }

    pub async fn close(self) {
        self.task.abort();
        self.store.close().await;
    }
}

impl Drop for Server {
    /// Best effort: a schema left behind by a crashed run costs disk space, nothing else.
    fn drop(&mut self) {
        let Some((base, schema)) = self.pg_schema.take() else {
            return;
        };
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
                    let sql =
                        format!("SET lock_timeout = '2s'; DROP SCHEMA IF EXISTS {schema} CASCADE");
                    let _ = conn.execute(sql.as_str()).await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}
