//! Plan quota usage counts (table `quota_usage`), written by gateway nodes' quota sync and
//! read by it and by the Admin API's usage endpoint. Writes here are not configuration: they
//! do not bump the store version nor go through [`crate::StoreTx`].

use crate::Store;
use crate::db::Arg;
use crate::error::Result;

const ADD_USAGE: &str = "INSERT INTO quota_usage \
    (application, service, period, period_start, used, updated_at) \
    VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (application, service, period, period_start) \
    DO UPDATE SET used = quota_usage.used + excluded.used, updated_at = excluded.updated_at";

const USAGE_SINCE: &str = "SELECT application, service, period, period_start, used \
    FROM quota_usage WHERE period_start >= $1 \
    ORDER BY application, service, period, period_start";

const USAGE_OF: &str = "SELECT application, service, period, period_start, used \
    FROM quota_usage WHERE application = $1 AND period_start >= $2 \
    ORDER BY application, service, period, period_start";

const PRUNE_USAGE: &str = "DELETE FROM quota_usage WHERE period_start < $1";

/// One usage counter: requests of `application` to `service` in the `period` starting at
/// `period_start`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::FromRow)]
pub struct Usage {
    /// Application id.
    pub application: String,
    /// Service id.
    pub service: String,
    /// `day` or `month`.
    pub period: String,
    /// Start of the period, epoch milliseconds (UTC).
    pub period_start: i64,
    /// Requests counted (for [`Store::add_usage`]: to add).
    pub used: i64,
}

impl Store {
    /// Adds each delta to its counter (creating it at the delta), in one transaction. Deltas
    /// are applied in key order, so two nodes flushing the same counters lock them in the
    /// same order and cannot deadlock.
    pub async fn add_usage(&self, deltas: &[Usage], now_ms: i64) -> Result<()> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut sorted: Vec<&Usage> = deltas.iter().collect();
        sorted.sort();
        let pool = &self.inner.pool;
        let mut tx = pool.begin(pool.dialect().begin_write).await?;
        for d in sorted {
            let args: [Arg<'_>; 6] = [
                d.application.as_str().into(),
                d.service.as_str().into(),
                d.period.as_str().into(),
                d.period_start.into(),
                d.used.into(),
                now_ms.into(),
            ];
            tx.exec().execute(ADD_USAGE, &args).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every counter of a period starting at or after `since` (epoch milliseconds).
    pub async fn usage_since(&self, since: i64) -> Result<Vec<Usage>> {
        Ok(self
            .inner
            .pool
            .exec()
            .fetch_all(USAGE_SINCE, &[since.into()])
            .await?)
    }

    /// Deletes the counters of periods that started before `before` (epoch milliseconds);
    /// returns how many went.
    pub async fn prune_usage(&self, before: i64) -> Result<u64> {
        Ok(self
            .inner
            .pool
            .exec()
            .execute(PRUNE_USAGE, &[before.into()])
            .await?)
    }

    /// The counters of one application for periods starting at or after `since`.
    pub async fn usage_of(&self, application: &str, since: i64) -> Result<Vec<Usage>> {
        Ok(self
            .inner
            .pool
            .exec()
            .fetch_all(USAGE_OF, &[application.into(), since.into()])
            .await?)
    }
}
