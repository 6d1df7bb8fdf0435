//! Change propagation: keeps the store's version channel current.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::db::Pool;
use crate::error::Result;
use crate::{CHANGES_CHANNEL, sql};

/// A zero interval would make Tokio's timer panic and a tiny one would hammer the database.
const MIN_POLL: Duration = Duration::from_millis(10);

/// Raises the published version, never lowers it: a poll that read an older version than a
/// local commit just published must not undo it.
pub(crate) fn publish(sender: &watch::Sender<i64>, version: i64) {
    sender.send_if_modified(|current| {
        let newer = version > *current;
        if newer {
            *current = version;
        }
        newer
    });
}

/// The background task behind [`Store::watch`](crate::Store::watch).
pub(crate) struct Watcher {
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl Watcher {
    /// Sets up LISTEN before returning, so that a commit made after `watch()` returns is
    /// never missed, then starts the poll loop.
    pub(crate) async fn start(
        pool: &Pool,
        sender: &Arc<watch::Sender<i64>>,
        poll: Duration,
    ) -> Result<(Self, watch::Receiver<i64>)> {
        let poll = poll.max(MIN_POLL);
        let listener = match pool {
            Pool::Sqlite(_) => None,
            Pool::Postgres(pg) => {
                // Its own single connection: a LISTEN session must stay open for good, and
                // should not take a connection from the pool the queries use.
                let options = (*pg.connect_options()).clone();
                let listener_pool = PgPoolOptions::new()
                    .max_connections(1)
                    .max_lifetime(None)
                    .idle_timeout(None)
                    .connect_with(options)
                    .await?;
                let mut listener = PgListener::connect_with(&listener_pool).await?;
                listener.listen(CHANGES_CHANNEL).await?;
                let wake = Arc::new(Notify::new());
                let forward = AbortOnDrop(tokio::spawn(forward(listener, wake.clone(), poll)));
                Some((wake, forward))
            }
        };
        let (version,): (i64,) = pool.exec().fetch_one(sql::CURRENT_VERSION, &[]).await?;
        publish(sender, version);
        // Subscribed before the task starts, or the task could see no receiver and stop.
        let receiver = sender.subscribe();
        let stop = CancellationToken::new();
        let task = tokio::spawn(poll_loop(
            pool.clone(),
            Arc::clone(sender),
            stop.clone(),
            listener,
            poll,
        ));
        Ok((Self { task, stop }, receiver))
    }

    pub(crate) fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        // The task only ends by returning (it never panics), so the join result says nothing.
        let _ = (&mut self.task).await;
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Re-reads the version on every notification and every tick. Notifications are only a
/// wake-up: channels are shared by all schemas of a database, so the payload may be about
/// another store.
async fn poll_loop(
    pool: Pool,
    sender: Arc<watch::Sender<i64>>,
    stop: CancellationToken,
    listener: Option<(Arc<Notify>, AbortOnDrop)>,
    poll: Duration,
) {
    let wake = listener.as_ref().map(|(wake, _)| Arc::clone(wake));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = sender.closed() => return,
            () = notified(wake.as_deref()) => {}
            _ = ticker.tick() => {}
        }
        match pool
            .exec()
            .fetch_one::<(i64,)>(sql::CURRENT_VERSION, &[])
            .await
        {
            Ok((version,)) => {
                if !healthy {
                    tracing::info!("store version poll recovered");
                    healthy = true;
                }
                publish(&sender, version);
            }
            // Logged once per outage, not once per tick.
            Err(error) if healthy => {
                tracing::warn!(%error, "store version poll failed; retrying every {poll:?}");
                healthy = false;
            }
            Err(_) => {}
        }
    }
}

async fn notified(wake: Option<&Notify>) {
    match wake {
        Some(wake) => wake.notified().await,
        None => std::future::pending().await,
    }
}

/// Forwards notifications as wake-ups. A separate task so that the listener's receive is
/// never cancelled half-way by the poll loop's `select!`.
async fn forward(mut listener: PgListener, wake: Arc<Notify>, retry: Duration) {
    loop {
        match listener.try_recv().await {
            // `Ok(None)`: the connection was lost and is being re-established; notifications
            // sent meanwhile are gone, so a re-read is due either way.
            Ok(_) => wake.notify_one(),
            Err(error) => {
                tracing::warn!(%error, "LISTEN {CHANGES_CHANNEL} failed; polling meanwhile");
                wake.notify_one();
                // Back off before reconnecting instead of spinning on a database that is down.
                tokio::time::sleep(retry).await;
            }
        }
    }
}
