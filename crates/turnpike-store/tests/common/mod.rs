//! Real databases for the store tests: a SQLite file in a temporary directory, or a fresh
//! PostgreSQL schema per test (so tests run in parallel on one database without seeing each
//! other's rows). PostgreSQL tests fail, never skip, when the server is unreachable.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sqlx::{Connection, Executor};
use turnpike_store::{Backend, Store};

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct TestDb {
    pub store: Store,
    /// The URL the store was opened with; another `Store::open` on it sees the same data.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// (server URL without the schema option, schema) to drop at the end.
    pg_schema: Option<(String, String)>,
}

impl TestDb {
    pub async fn open(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Self::sqlite().await,
            Backend::Postgres => Self::postgres().await,
        }
    }

    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // A nested path: opening must create the missing directories.
        let path = dir.path().join("data").join("store.db");
        let url = format!("sqlite://{}", path.display());
        let store = Store::open(&url).await.expect("open SQLite store");
        Self {
            store,
            url,
            _dir: Some(dir),
            pg_schema: None,
        }
    }

    pub async fn postgres() -> Self {
        let base = std::env::var("TURNPIKE_TEST_PG").unwrap_or_else(|_| DEFAULT_PG.to_owned());
        let schema = format!("tp_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = sqlx::PgConnection::connect(&base).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {base} ({e}). The PostgreSQL store tests need a \
                 real server: run scripts/services.sh, or set TURNPIKE_TEST_PG to a server URL."
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
        Self {
            store,
            url,
            _dir: None,
            pg_schema: Some((base, schema)),
        }
    }

    /// A second, independent store on the same database (another node, another process).
    pub async fn open_another(&self) -> Store {
        Store::open(&self.url)
            .await
            .expect("open the same store again")
    }

    /// Runs raw SQL on a connection of its own, bypassing the store API.
    pub async fn raw_execute(&self, sql: &str) -> Result<u64, sqlx::Error> {
        match self.store.backend() {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url).await?;
                Ok(conn.execute(sql).await?.rows_affected())
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url).await?;
                Ok(conn.execute(sql).await?.rows_affected())
            }
        }
    }

    /// Runs a raw query that returns one integer (a `COUNT(*)`), bypassing the store API.
    pub async fn raw_count(&self, sql: &str) -> Result<i64, sqlx::Error> {
        match self.store.backend() {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url).await?;
                sqlx::query_scalar(sql).fetch_one(&mut conn).await
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url).await?;
                sqlx::query_scalar(sql).fetch_one(&mut conn).await
            }
        }
    }

    pub async fn close(&self) {
        self.store.close().await;
    }
}

impl Drop for TestDb {
    /// Best effort: a schema left behind by a crashed run costs disk space, nothing else.
    fn drop(&mut self) {
        let Some((base, schema)) = self.pg_schema.take() else {
            return;
        };
        // Drop cannot await; a thread with its own runtime works even while unwinding.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
                    // A transaction leaked by a failed test must not make the cleanup hang.
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

/// Instantiates async test functions `async fn name(db: &TestDb)` once per backend, as
/// `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $crate::backend_tests!(sqlite, $($name),*);
        $crate::backend_tests!(postgres, $($name),*);
    };
}

/// One module of [`both_backends!`]: `$backend` names both the module and the `TestDb`
/// constructor.
#[macro_export]
macro_rules! backend_tests {
    ($backend:ident, $($name:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::common::TestDb::$backend().await;
                    super::$name(&db).await;
                    db.close().await;
                }
            )*
        }
    };
}
