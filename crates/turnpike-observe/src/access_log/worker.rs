//! The background task of one sink: takes events off its queue, groups them, hands each
//! group to the sink's writer with a time limit and bounded retries, and counts the outcome.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use turnpike_model::observe::access_log::BatchConfig;

use super::Counters;
use super::format::Formatter;
use crate::CallEvent;

/// Writes one group of events somewhere.
pub(crate) trait Deliver: Send + 'static {
    /// Sends `events` (formatted with `fmt`); an error means none of them can be counted
    /// as sent, and the group may be sent again.
    fn deliver(
        &mut self,
        events: &[Arc<CallEvent>],
        fmt: &Formatter,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// What a sink's task is given.
pub(crate) struct Context {
    pub(crate) name: String,
    pub(crate) rx: mpsc::Receiver<Arc<CallEvent>>,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) formatter: Arc<Formatter>,
}

/// How a sink groups and retries.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    batch_size: usize,
    max_delay: Duration,
    timeout: Option<Duration>,
    max_retries: u32,
    backoff: Duration,
    /// How long a batch that is not full waits for more, without waking per event.
    linger: Duration,
}

/// How long a local writer lets a batch gather. Each batch costs a hand-off to another
/// thread and a system call; at thousands of requests per second, writing each event as it
/// comes cost the gateway a quarter of its throughput (`bench/run.sh observe`), while 20 ms
/// of delay in a log line is invisible.
pub(crate) const LOCAL_LINGER: Duration = Duration::from_millis(20);

/// Local writers (stdout, file, syslog): what gathers within [`LOCAL_LINGER`] goes at
/// once, no retries.
pub(crate) fn local() -> Policy {
    Policy {
        batch_size: 1024,
        max_delay: Duration::ZERO,
        timeout: None,
        max_retries: 0,
        backoff: Duration::ZERO,
        linger: LOCAL_LINGER,
    }
}

/// Remote writers: the configured batching, timeout and retries.
pub(crate) fn remote(b: &BatchConfig) -> Policy {
    Policy {
        batch_size: b.batch_size.max(1),
        max_delay: b.max_delay,
        timeout: Some(b.timeout),
        max_retries: b.max_retries,
        backoff: b.retry_backoff,
        linger: Duration::ZERO,
    }
}

pub(crate) fn spawn<D: Deliver>(ctx: Context, policy: Policy, writer: D) -> JoinHandle<()> {
    tokio::spawn(run(ctx, policy, writer))
}

async fn run<D: Deliver>(mut ctx: Context, policy: Policy, mut writer: D) {
    let mut batch = Vec::with_capacity(policy.batch_size.min(1024));
    loop {
        let first = tokio::select! {
            biased;
            e = ctx.rx.recv() => e,
            _ = stopped(&mut ctx.stop) => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        drain(&mut ctx.rx, &mut batch, policy.batch_size);
        if batch.len() < policy.batch_size && !policy.linger.is_zero() && !*ctx.stop.borrow() {
            // One timer instead of a wake-up per event; the queue holds what arrives.
            tokio::select! {
                () = tokio::time::sleep(policy.linger) => {}
                () = stopped(&mut ctx.stop) => {}
            }
            drain(&mut ctx.rx, &mut batch, policy.batch_size);
        }
        let until = Instant::now() + policy.max_delay;
        while batch.len() < policy.batch_size {
            match ctx.rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if policy.max_delay.is_zero() || *ctx.stop.borrow() {
                        break;
                    }
                    // Shutdown does not wait for the batch to fill.
                    let next = tokio::select! {
                        r = tokio::time::timeout_at(until, ctx.rx.recv()) => r.ok().flatten(),
                        _ = stopped(&mut ctx.stop) => None,
                    };
                    match next {
                        Some(e) => batch.push(e),
                        None => break,
                    }
                }
            }
        }
        send(&mut ctx, &policy, &mut writer, &mut batch).await;
    }
    // Stopping: send what is still queued (the caller bounds how long this may take).
    ctx.rx.close();
    while let Ok(e) = ctx.rx.try_recv() {
        batch.push(e);
        if batch.len() >= policy.batch_size {
            send(&mut ctx, &policy, &mut writer, &mut batch).await;
        }
    }
    if !batch.is_empty() {
        send(&mut ctx, &policy, &mut writer, &mut batch).await;
    }
}

/// Moves queued events into `batch` until it holds `max`.
fn drain(rx: &mut mpsc::Receiver<Arc<CallEvent>>, batch: &mut Vec<Arc<CallEvent>>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(e) => batch.push(e),
            Err(_) => break,
        }
    }
}

/// Resolves once stop is asked for (or the access log is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn send<D: Deliver>(
    ctx: &mut Context,
    policy: &Policy,
    writer: &mut D,
    batch: &mut Vec<Arc<CallEvent>>,
) {
    let n = batch.len();
    let mut attempt = 0u32;
    loop {
        let sent = writer.deliver(batch, &ctx.formatter);
        let result = match policy.timeout {
            Some(t) => tokio::time::timeout(t, sent)
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {t:?}"))),
            None => sent.await,
        };
        match result {
            Ok(()) => {
                ctx.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
                break;
            }
            Err(why) if attempt >= policy.max_retries || *ctx.stop.borrow() => {
                ctx.counters.failed(&ctx.name, n, &why);
                break;
            }
            Err(_) => {
                // Capped, so a long run of failures does not park the sink for hours.
                let delay = policy
                    .backoff
                    .saturating_mul(2u32.saturating_pow(attempt.min(16)))
                    .min(Duration::from_secs(30));
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(&mut ctx.stop) => {}
                }
            }
        }
    }
    batch.clear();
}

/// Runs a blocking writer (file, stdout) on the blocking pool, so a slow disk holds no
/// runtime thread. The writer moves into the closure and comes back with the result.
pub(crate) struct Blocking<W> {
    writer: Option<W>,
}

/// A writer of JSON lines that may block.
pub(crate) trait LineWriter: Send + 'static {
    fn write_lines(&mut self, lines: &Lines) -> std::io::Result<()>;
}

/// A batch of JSON lines in one buffer, each ending with a newline.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
    /// Where each line ends in `buf` (one past its newline).
    ends: Vec<usize>,
}

impl Lines {
    /// The records of `events`, one line each.
    pub(crate) fn format(events: &[Arc<CallEvent>], fmt: &Formatter) -> Self {
        let mut lines = Self {
            buf: Vec::with_capacity(events.len() * 320),
            ends: Vec::with_capacity(events.len()),
        };
        for e in events {
            fmt.write_line(e, &mut lines.buf);
            lines.end_line();
        }
        lines
    }

    /// Ends the line written so far.
    pub(crate) fn end_line(&mut self) {
        self.buf.push(b'\n');
        self.ends.push(self.buf.len());
    }

    /// Adds one line (without its newline).
    #[cfg(test)]
    pub(crate) fn push(&mut self, line: &str) {
        self.buf.extend_from_slice(line.as_bytes());
        self.end_line();
    }

    /// Every line, newlines included.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Where each line ends in [`Self::bytes`].
    pub(crate) fn ends(&self) -> &[usize] {
        &self.ends
    }
}

impl<W: LineWriter> Blocking<W> {
    pub(crate) fn new(writer: W) -> Self {
        Self {
            writer: Some(writer),
        }
    }
}

impl<W: LineWriter> Deliver for Blocking<W> {
    async fn deliver(&mut self, events: &[Arc<CallEvent>], fmt: &Formatter) -> Result<(), String> {
        let lines = Lines::format(events, fmt);
        let Some(mut w) = self.writer.take() else {
            return Err("writer lost".into());
        };
        let (w, result) = tokio::task::spawn_blocking(move || {
            let r = w.write_lines(&lines);
            (w, r)
        })
        .await
        .map_err(|e| format!("writer task failed: {e}"))?;
        self.writer = Some(w);
        result.map_err(|e| e.to_string())
    }
}
