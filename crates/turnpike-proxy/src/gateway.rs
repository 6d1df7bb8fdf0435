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

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    registry: Mutex<UpstreamRegistry>,
    listeners: Vec<(String, SocketAddr)>,
    listener_config: Vec<turnpike_model::ListenerConfig>,
    shutdown: CancellationToken,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
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
            listeners.push((name, listener.local_addr()));
            let shared = shared.clone();
            let make = move |info: ConnInfo| {
                let conn = ClientConn::new(info.peer, info.tls).with_client_cert(info.client_cert);
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
        }))
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

    /// Version of the live snapshot.
    pub fn version(&self) -> u64 {
        self.shared.snapshot.load().version
    }

    /// Compiles `config` and swaps it in atomically. On error the running snapshot stays.
    /// Requests already in flight finish on the snapshot they started with.
    pub async fn reload(&self, config: &Config) -> Result<u64, ConfigErrors> {
        let mut registry = self.registry.lock().await;
        let snapshot = registry.compile(config).await?;
        if config.server.listeners != self.listener_config {
            tracing::warn!("listener changes take effect after a restart; other changes are live");
        }
        let version = snapshot.version;
        self.shared.snapshot.store(Arc::new(snapshot));
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
    }
}
