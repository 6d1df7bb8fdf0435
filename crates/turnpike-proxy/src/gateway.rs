//! The running gateway: listeners, the live snapshot, reloads and shutdown.
//!
//! Embedders and tests drive everything through [`Gateway`]: start it from a configuration,
//! read the bound addresses, reload, shut down.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use turnpike_model::{Config, ConfigError, ConfigErrors};

use crate::listener::{ConnInfo, Listener};
use crate::proxy::{ClientConn, Shared};
use crate::snapshot::UpstreamRegistry;
use crate::status::{DataPlaneCollector, ReloadStats, Status};

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    registry: Mutex<UpstreamRegistry>,
    listeners: Vec<(String, SocketAddr)>,
    listener_config: Vec<turnpike_model::ListenerConfig>,
    shutdown: CancellationToken,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    status: Arc<Status>,
    reloads: Arc<ReloadStats>,
    metrics_config: turnpike_model::observe::MetricsConfig,
    status_addr: Option<SocketAddr>,
    status_stop: CancellationToken,
    status_task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Gateway {
    /// Validates and compiles `config`, binds every listener and starts serving.
    pub async fn start(config: &Config) -> Result<Arc<Self>, ConfigErrors> {
        let mut registry = UpstreamRegistry::default();
        let snapshot = registry.compile(config).await?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            quotas: Arc::default(),
            observer: Arc::default(),
        });
        let shutdown = CancellationToken::new();

        let metrics_config = config.observability.metrics.clone();
        let reloads = Arc::new(ReloadStats::default());
        let metrics = Arc::new(turnpike_observe::metrics::Metrics::new(
            &turnpike_observe::metrics::MetricsOptions {
                count_requests: metrics_config.enabled,
                per_application: metrics_config.per_application,
                max_applications: metrics_config.max_applications,
                buckets: metrics_config.buckets.clone(),
            },
            vec![Box::new(DataPlaneCollector {
                shared: Arc::downgrade(&shared),
                reloads: reloads.clone(),
            })],
        ));
        if metrics_config.enabled {
            shared.observer.add(metrics.clone());
        }
        let status = Arc::new(Status::new(shared.clone(), metrics, shutdown.clone()));
        let status_listener = match metrics_config.listen.as_deref() {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                ConfigError::at(
                    "observability.metrics.listen",
                    format!("cannot listen on {addr}: {e}"),
                )
            })?),
            None => None,
        };
        let status_addr = status_listener.as_ref().and_then(crate::status::bound);
        let status_stop = CancellationToken::new();
        if let Some(addr) = status_addr {
            tracing::info!(listener = "status", %addr, "listening");
        }
        let status_task = status_listener
            .map(|l| tokio::spawn(crate::status::serve(l, status.clone(), status_stop.clone())));

        let mut bound = Vec::new();
        for (i, l) in config.server.listeners.iter().enumerate() {
            let listener = Listener::bind(l, &config.server.limits)
                .await
                .map_err(|e| ConfigError::at(format!("server.listeners[{i}]"), e))?;
            bound.push((l.name.clone(), listener));
        }
        let mut listeners = Vec::new();
        let mut tasks = Vec::new();
        for (name, listener) in bound {
            let listener_name: Arc<str> = Arc::from(name.as_str());
            listeners.push((name, listener.local_addr()));
            let shared = shared.clone();
            let make = move |info: ConnInfo| {
                let conn = ClientConn::new(info.peer, info.tls)
                    .with_client_cert(info.client_cert)
                    .with_listener(listener_name.clone());
                crate::proxy::service(shared.clone(), conn)
            };
            tasks.push(tokio::spawn(listener.serve(
                make,
                shutdown.clone(),
                config.server.drain_timeout,
            )));
        }
        tracing::info!(
            version = shared.snapshot.load().version,
            "configuration loaded"
        );
        Ok(Arc::new(Self {
            shared,
            registry: Mutex::new(registry),
            listeners,
            listener_config: config.server.listeners.clone(),
            shutdown,
            tasks: std::sync::Mutex::new(tasks),
            status,
            reloads,
            metrics_config,
            status_addr,
            status_stop,
            status_task: std::sync::Mutex::new(status_task),
        }))
    }

    /// The status endpoints (`/metrics`, `/healthz`, `/readyz`, `/version`), for whatever
    /// listener serves them besides `observability.metrics.listen`.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Address of the dedicated status listener, when `observability.metrics.listen` is set.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }

    /// Counts a reload that failed before reaching [`Gateway::reload`] (the control plane
    /// could not read the store), so `turnpike_config_reloads_total{result="failure"}` sees
    /// every failed attempt.
    pub fn count_failed_reload(&self) {
        self.reloads.failed();
    }

    /// Address a listener is bound to, by name.
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == listener)
            .map(|(_, a)| *a)
    }

    /// Addresses of all listeners, in configuration order.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.clone()
    }

    /// The plan quota counters, for the control plane's quota sync and for tests (which
    /// replace its clock).
    pub fn quotas(&self) -> Arc<crate::quota::QuotaTracker> {
        self.shared.quotas.clone()
    }

    /// Where finished calls are emitted: register metrics, log sinks and stores here.
    pub fn observer(&self) -> Arc<turnpike_observe::Observer> {
        self.shared.observer.clone()
    }

    /// Targets of upstream `name` that may receive traffic now (healthy, not ejected), and
    /// all its targets; `None` when the live snapshot has no such upstream. For alerts.
    pub fn upstream_health(&self, name: &str) -> Option<(usize, usize)> {
        let snapshot = self.shared.snapshot.load();
        let (upstream, _) = snapshot.upstreams.get(name)?;
        let targets = upstream.targets();
        let available = targets.iter().filter(|t| t.is_available()).count();
        Some((available, targets.len()))
    }

    /// The live snapshot's store-managed index (subscriptions, plan quotas), for alerts.
    pub fn managed(&self) -> Arc<turnpike_model::managed::Managed> {
        self.shared.snapshot.load().managed.clone()
    }

    /// The response cache's store (the `cache` policy's entries), for purges.
    pub fn cache(&self) -> Arc<crate::cache::CacheStore> {
        self.shared.snapshot.load().cache.clone()
    }

    /// Version of the live snapshot.
    pub fn version(&self) -> u64 {
        self.shared.snapshot.load().version
    }

    /// Compiles `config` and swaps it in atomically. On error the running snapshot stays.
    /// Requests already in flight finish on the snapshot they started with.
    pub async fn reload(&self, config: &Config) -> Result<u64, ConfigErrors> {
        let mut registry = self.registry.lock().await;
        let snapshot = match registry.compile(config).await {
            Ok(s) => s,
            Err(e) => {
                self.reloads.failed();
                return Err(e);
            }
        };
        if config.server.listeners != self.listener_config {
            tracing::warn!("listener changes take effect after a restart; other changes are live");
        }
        if config.observability.metrics != self.metrics_config {
            tracing::warn!(
                "observability.metrics changes take effect after a restart; other changes are live"
            );
        }
        let version = snapshot.version;
        self.shared.snapshot.store(Arc::new(snapshot));
        self.reloads.succeeded();
        tracing::info!(version, "configuration reloaded");
        Ok(version)
    }

    /// Stops accepting, drains in-flight requests within the configured deadline, and
    /// returns when every listener has stopped.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => Vec::new(),
        };
        for t in tasks {
            let _ = t.await;
        }
        // The status listener answered `/readyz` with 503 while draining; now it stops too.
        self.status_stop.cancel();
        let status = match self.status_task.lock() {
            Ok(mut t) => t.take(),
            Err(_) => None,
        };
        if let Some(t) = status {
            let _ = t.await;
        }
    }
}
