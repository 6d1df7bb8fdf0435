//! The store's error type and the mapping from driver errors to it.

use sqlx::error::DatabaseError;

/// A boxed cause, so the public error type does not pin a driver version.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store operation failed.
///
/// The variants are what a caller branches on: the Admin API maps `NotFound` to 404,
/// `Conflict` to 412 (If-Match), `Duplicate`/`DuplicateId` to 409, `Invalid` to 400 and
/// `Unavailable` to 503 (retry later); everything else is a 500.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No object (or token, or release) with this id.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// The kind that was looked up.
        kind: String,
        /// The id that was looked up.
        id: String,
    },
    /// The object changed since the caller read it: its revision (ETag) is not the expected one.
    #[error("{kind} {id:?} is at revision {actual}, not the expected {expected}")]
    Conflict {
        /// The object's kind.
        kind: String,
        /// The object's id.
        id: String,
        /// The revision the caller said it had read.
        expected: i64,
        /// The revision in the store.
        actual: i64,
    },
    /// Another object of this kind in the same team (or without a team) has this name.
    #[error("a {kind} named {name:?} already exists")]
    Duplicate {
        /// The object's kind.
        kind: String,
        /// The name already taken.
        name: String,
    },
    /// A caller-given id is already used by another object of this kind.
    #[error("a {kind} with id {id:?} already exists")]
    DuplicateId {
        /// The object's kind.
        kind: String,
        /// The id already taken.
        id: String,
    },
    /// The database cannot be reached or is too busy (pool exhausted, connection lost, lock
    /// timeout). Retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The request itself is wrong (bad URL, empty name, bad cursor, poisoned transaction).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// Applying the embedded migrations failed (or the database has migrations this build
    /// does not know).
    #[error("store migration failed: {0}")]
    Migration(#[source] BoxError),
    /// Anything else: a bug, a corrupt row, an unexpected database error.
    #[error("store error: {0}")]
    Other(#[source] BoxError),
}

impl StoreError {
    pub(crate) fn not_found(kind: &str, id: &str) -> Self {
        Self::NotFound {
            kind: kind.to_owned(),
            id: id.to_owned(),
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            E::Configuration(_) => Self::Invalid(error.to_string()),
            E::Io(_)
            | E::Tls(_)
            | E::Protocol(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::WorkerCrashed => Self::Unavailable(Box::new(error)),
            E::Database(db) if is_transient(db.as_ref()) => Self::Unavailable(Box::new(error)),
            E::Migrate(_) => Self::Migration(Box::new(error)),
            _ => Self::Other(Box::new(error)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        match error {
            sqlx::migrate::MigrateError::Execute(inner) => match Self::from(inner) {
                unavailable @ Self::Unavailable(_) => unavailable,
                other => Self::Migration(Box::new(other)),
            },
            other => Self::Migration(Box::new(other)),
        }
    }
}

/// Database errors that say "not now" rather than "never": the caller may retry.
fn is_transient(error: &dyn DatabaseError) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // Extended result codes keep the primary code in the low byte: BUSY = 5, LOCKED = 6.
        return code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
    }
    // SQLSTATE: connection exceptions, insufficient resources, operator intervention
    // (shutdown), lock_not_available (lock_timeout), serialization failure, deadlock.
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(&*code, "55P03" | "40001" | "40P01")
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
