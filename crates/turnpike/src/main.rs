//! The `turnpike` binary: command line, configuration loading, signals and hot reload.
//! The gateway itself lives in `turnpike-proxy`; this file only wires it to the process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use turnpike_control::ControlPlane;
use turnpike_model::{Config, ConfigError, ConfigErrors, Format, Source};
use turnpike_proxy::demo::DemoServer;
use turnpike_proxy::gateway::Gateway;
use turnpike_store::Store;

/// jemalloc instead of the C library's allocator. Profiles of the proxy benchmark showed
/// glibc's malloc on its slow path (bin consolidation) for the 8 KiB read buffers hyper
/// allocates as connections read; side by side, jemalloc took about 7 % less CPU per request
/// (median of 7 interleaved runs) for about 3 MiB more peak RSS.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The quickstart configuration, used when no `--config` is given.
const QUICKSTART: &str = include_str!("../../../examples/quickstart.yaml");

/// Where runtime state goes when neither a flag nor the file names a directory.
const DEFAULT_DATA_DIR: &str = "turnpike-data";

#[derive(Parser, Debug)]
#[command(
    name = "turnpike",
    version,
    about = "API gateway, API management platform and AI gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default command).
    Serve(ServeArgs),
    /// Check a configuration file and exit: 0 if valid, 1 with every error otherwise.
    Validate {
        /// The file to check (YAML, or JSON if it ends in `.json`).
        file: PathBuf,
    },
    /// Print version and build information.
    Version,
    /// Print every managed object as one YAML document (for Git).
    Export(StoreArgs),
    /// Make the store match a document: prints the diff per object and applies it in one
    /// transaction. Collections the document leaves out are not touched.
    Apply {
        #[command(flatten)]
        store: StoreArgs,
        /// The document (YAML or JSON), as `turnpike export` writes it.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show the diff and run every check, but change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Management store administration.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Admin API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run only the built-in demo upstream (for trying routes and for benchmarks).
    DemoUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Name reported in `x-served-by`.
        #[arg(long, default_value = "demo")]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Create the first super admin (`admin`) and print its token, if the store has no user.
    Bootstrap(StoreArgs),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create an Admin API token for a user and print it (shown once).
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// The user the token acts as.
        #[arg(long, default_value = "admin")]
        user: String,
        /// A label for the token.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Lifetime, like `30d` or `12h`; without it the token does not expire.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

/// Where the store is, for commands that only talk to the store.
#[derive(clap::Args, Debug, Clone)]
struct StoreArgs {
    /// Management store URL. Default: `sqlite://<data-dir>/turnpike.db`.
    #[arg(long, env = "TURNPIKE_STORE")]
    store: Option<String>,
    /// Data directory holding the embedded store.
    #[arg(long, env = "TURNPIKE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

impl StoreArgs {
    fn url(&self) -> String {
        self.store
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("turnpike.db").display()))
    }
}

#[derive(clap::Args, Debug, Clone)]
struct ServeArgs {
    /// Configuration file (YAML or JSON). Without it, the embedded quickstart runs with the
    /// demo upstream.
    #[arg(short, long, env = "TURNPIKE_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides listener addresses: `ip:port` for the first listener, `NAME=ip:port` for the
    /// listener called NAME. Repeatable; in the environment, comma-separated.
    #[arg(long, env = "TURNPIKE_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Directory for runtime state: the embedded store, the last good configuration and
    /// store state. Default: `turnpike-data` in the working directory.
    #[arg(long, env = "TURNPIKE_DATA_DIR")]
    data_dir: Option<String>,
    /// Management store: `sqlite://PATH`, `postgres://...`, or `none` to serve the file alone.
    /// Default: `sqlite://<data-dir>/turnpike.db`.
    #[arg(long, env = "TURNPIKE_STORE")]
    store: Option<String>,
    /// Address of the Admin API (`/admin/v1`). Keep it on loopback or a private network.
    #[arg(long, env = "TURNPIKE_ADMIN_LISTEN", default_value = "127.0.0.1:8001")]
    admin_listen: SocketAddr,
    /// How often the store version is polled, as a fallback to change notifications.
    #[arg(long, env = "TURNPIKE_STORE_POLL", default_value = "1s", value_parser = humantime::parse_duration)]
    store_poll: Duration,
    /// How often plan quota counts are flushed to the store and the cluster's totals reloaded.
    /// With several nodes, a quota can be exceeded by what the other nodes admit in one
    /// interval.
    #[arg(long, env = "TURNPIKE_QUOTA_FLUSH_INTERVAL", default_value = "5s", value_parser = parse_flush_interval)]
    quota_flush_interval: Duration,
    /// How long quota counters of past days and months are kept in the store (at least 32
    /// days, so the current month's are never deleted).
    #[arg(long, env = "TURNPIKE_QUOTA_RETENTION", default_value = "400days", value_parser = parse_quota_retention)]
    quota_retention: Duration,
    /// How long start-up waits for the store before serving the saved store state instead.
    #[arg(long, env = "TURNPIKE_STORE_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    store_connect_timeout: Duration,
    /// Log filter: `error`, `warn`, `info`, `debug`, `trace`, or a tracing directive list.
    #[arg(long, env = "TURNPIKE_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, env = "TURNPIKE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Also start the built-in demo upstream (always on without `--config`).
    #[arg(long, env = "TURNPIKE_DEMO")]
    demo: bool,
    /// Address of the demo upstream.
    #[arg(long, env = "TURNPIKE_DEMO_ADDR", default_value = "127.0.0.1:8081")]
    demo_addr: SocketAddr,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Version) => {
            println!("turnpike {}", env!("CARGO_PKG_VERSION"));
            println!("config schema version: 1");
            ExitCode::SUCCESS
        }
        Some(Command::Validate { file }) => run_async(validate(file)),
        Some(Command::Serve(args)) => run_async(serve(args)),
        Some(Command::DemoUpstream { listen, name }) => run_async(demo_upstream(listen, name)),
        Some(Command::Export(store)) => run_async(export(store)),
        Some(Command::Apply {
            store,
            file,
            dry_run,
        }) => run_async(apply(store, file, dry_run)),
        Some(Command::Admin {
            command: AdminCommand::Bootstrap(store),
        }) => run_async(admin_bootstrap(store)),
        Some(Command::Token {
            command:
                TokenCommand::Create {
                    store,
                    user,
                    name,
                    ttl,
                },
        }) => run_async(token_create(store, user, name, ttl)),
        None => run_async(serve(cli.serve)),
    }
}

fn run_async(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo_upstream(listen: SocketAddr, name: String) -> ExitCode {
    match DemoServer::start(listen, &name).await {
        Ok(d) => {
            eprintln!("demo upstream `{name}` listening on {}", d.local_addr());
            wait_for_termination().await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn open_for_command(args: &StoreArgs) -> Result<Store, ExitCode> {
    let url = args.url();
    Store::open(&url).await.map_err(|e| {
        eprintln!("error: cannot open the store {}: {e}", redact(&url));
        ExitCode::FAILURE
    })
}

async fn export(args: StoreArgs) -> ExitCode {
    let store = match open_for_command(&args).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let doc = match turnpike_admin::gitops::export(&store).await {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serde_yaml_ng::to_string(&doc) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot render the document: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn apply(args: StoreArgs, file: PathBuf, dry_run: bool) -> ExitCode {
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read `{}`: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let doc: serde_json::Value = match serde_yaml_ng::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{}: invalid YAML: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let store = match open_for_command(&args).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match turnpike_admin::gitops::apply(&store, &doc, "cli:apply", dry_run).await {
        Ok(changes) => {
            for c in &changes {
                println!("{c}");
            }
            let verb = if dry_run { "would change" } else { "changed" };
            eprintln!("{verb} {} object(s)", changes.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}

async fn admin_bootstrap(args: StoreArgs) -> ExitCode {
    let store = match open_for_command(&args).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match turnpike_admin::bootstrap(&store).await {
        Ok(Some(secret)) => {
            eprintln!("created the super admin `admin`; its token (shown once):");
            println!("{secret}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!(
                "the store already has users; use `turnpike token create --user NAME` for a new token"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn token_create(
    args: StoreArgs,
    user: String,
    name: String,
    ttl: Option<Duration>,
) -> ExitCode {
    let store = match open_for_command(&args).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match turnpike_admin::create_token(&store, &user, &name, ttl).await {
        Ok(secret) => {
            println!("{secret}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn validate(file: PathBuf) -> ExitCode {
    match load(Some(&file), &Overrides::default()) {
        Ok((config, source)) => {
            // Compiling builds regexes, templates and clients: the same checks a reload does.
            let mut registry = turnpike_proxy::snapshot::UpstreamRegistry::default();
            match registry.compile(&config).await {
                Ok(_) => {
                    println!(
                        "{}: ok ({} routes, {} upstreams, {} listeners)",
                        file.display(),
                        config.routes.len(),
                        config.upstreams.len(),
                        config.server.listeners.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}", source.locate(e));
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the configuration (file or embedded quickstart) and applies flag/env overrides.
/// Flag and environment values that override the file.
#[derive(Debug, Clone, Default)]
struct Overrides {
    listen: Vec<String>,
    data_dir: Option<String>,
}

impl From<&ServeArgs> for Overrides {
    fn from(a: &ServeArgs) -> Self {
        Self {
            listen: a.listen.clone(),
            data_dir: a.data_dir.clone(),
        }
    }
}

fn load(file: Option<&Path>, args: &Overrides) -> Result<(Config, Source), ConfigErrors> {
    let (mut config, source) = match file {
        Some(path) => turnpike_model::load_file(path)?,
        None => {
            let source = Source {
                file: "<embedded quickstart>".into(),
                text: QUICKSTART.into(),
            };
            let config = turnpike_model::parse(&source, Format::Yaml)?;
            (config, source)
        }
    };
    for (i, spec) in args.listen.iter().enumerate() {
        let at = format!("--listen[{i}] ({spec})");
        match spec.split_once('=') {
            Some((name, addr)) => match config.server.listeners.iter_mut().find(|l| l.name == name)
            {
                Some(l) => l.address = addr.to_owned(),
                None => {
                    return Err(ConfigError::at(
                        at,
                        format!("no listener named `{name}` in the configuration"),
                    )
                    .into());
                }
            },
            None => match config.server.listeners.first_mut() {
                Some(l) => l.address.clone_from(spec),
                None => config
                    .server
                    .listeners
                    .push(turnpike_model::ListenerConfig {
                        address: spec.clone(),
                        ..Default::default()
                    }),
            },
        }
    }
    if let Some(dir) = &args.data_dir {
        config.server.data_dir = Some(dir.clone());
    }
    if config.server.data_dir.is_none() {
        config.server.data_dir = Some(DEFAULT_DATA_DIR.to_owned());
    }
    turnpike_model::validate(&config).map_err(|e| source.locate(e))?;
    Ok((config, source))
}

fn init_logging(args: &ServeArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    init_logging(&args);
    let file = args.config.clone();
    let overrides = Overrides::from(&args);
    let (config, source) = match load(file.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };

    let _demo = if args.demo || file.is_none() {
        match DemoServer::start(args.demo_addr, "demo").await {
            Ok(d) => {
                tracing::info!(addr = %d.local_addr(), "demo upstream started");
                Some(d)
            }
            Err(e) => {
                eprintln!(
                    "error: cannot start the demo upstream on {}: {e}",
                    args.demo_addr
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };

    let data_dir = PathBuf::from(
        config
            .server
            .data_dir
            .as_deref()
            .unwrap_or(DEFAULT_DATA_DIR),
    );
    let store_url = match args.store.as_deref() {
        Some("none") => None,
        Some(url) => Some(url.to_owned()),
        None => Some(format!(
            "sqlite://{}",
            data_dir.join("turnpike.db").display()
        )),
    };
    let (store, state) = match &store_url {
        None => (None, None),
        Some(url) => match tokio::time::timeout(args.store_connect_timeout, open_store(url))
            .await
            .unwrap_or_else(|_| Err("no answer in time".to_owned()))
        {
            Ok((store, state)) => (Some(store), Some(state)),
            Err(e) => {
                // Serve what this node last served; keep trying the store in the background.
                tracing::error!(store = %redact(url), error = %e, "the store is unreachable");
                match turnpike_control::load_saved_state(&data_dir) {
                    Ok(Some(state)) => {
                        tracing::warn!(
                            store_version = state.version,
                            "serving the last store state saved in the data directory; admin writes are unavailable until the store is back"
                        );
                        (None, Some(state))
                    }
                    Ok(None) => (None, None),
                    Err(e) => {
                        tracing::warn!(error = %e, "no usable saved store state");
                        (None, None)
                    }
                }
            }
        },
    };
    let part = state
        .as_ref()
        .map(|s| (s.version, turnpike_control::compile(s)));
    if let Some((_, p)) = &part {
        for w in &p.warnings {
            tracing::warn!("{w}");
        }
    }
    let served = match &part {
        Some((_, p)) => turnpike_control::merge(&config, p),
        None => config.clone(),
    };
    let gateway = match Gateway::start(&served).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{}", source.locate(e));
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = save_last_good(&config, &source) {
        eprintln!("error: {e}");
        gateway.shutdown().await;
        return ExitCode::FAILURE;
    }
    // Access-log sinks hang off the gateway's observer; a reload that changes them
    // rebuilds them, shutdown flushes them.
    let access_logs = std::sync::Arc::new(turnpike_observe::access_log::AccessLogs::new(
        gateway.observer(),
    ));
    if let Err(e) = access_logs.apply(&config.observability.access_log) {
        eprintln!("error: {e}");
        gateway.shutdown().await;
        return ExitCode::FAILURE;
    }
    {
        let source: std::sync::Arc<dyn turnpike_observe::StatsSource> = access_logs.clone();
        gateway.observer().add_stats(&source);
    }
    let tracing_state = turnpike_observe::trace::Tracing::new(gateway.observer());
    if let Err(e) = tracing_state.apply(&config.observability.tracing) {
        eprintln!("error: observability.tracing: {e}");
        gateway.shutdown().await;
        return ExitCode::FAILURE;
    }
    if let Some(state) = &state
        && store.is_some()
        && let Err(e) = turnpike_control::save_state(&data_dir, state)
    {
        tracing::warn!(error = %e, "cannot save the store state");
    }
    let call_log = config.observability.call_log.clone();
    let control = ControlPlane::new(gateway.clone(), config, part, Some(data_dir));
    // Reload triggers are in place before we announce that we serve, so an edit made right
    // after start-up is never missed; one made while starting is caught by the comparison.
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<&'static str>(4);
    let _watcher = file.as_deref().and_then(|f| watch(f, reload_tx.clone()));
    if let Some(f) = file.as_deref() {
        if std::fs::read_to_string(f).ok().as_deref() != Some(source.text.as_str()) {
            let _ = reload_tx.try_send("file");
        }
    }
    spawn_sighup(reload_tx);
    // With a store configured, the Admin API listens from the start; until the store
    // answers, it answers every request with 503 `store_unavailable`.
    let admin = std::sync::Arc::new(std::sync::OnceLock::new());
    let opened: StoreSlot = std::sync::Arc::default();
    let mut management = Vec::new();
    if store_url.is_some() {
        // `/readyz` also needs the store to answer.
        gateway
            .status()
            .set_readiness_check(std::sync::Arc::new(StoreReady {
                store: opened.clone(),
            }));
        match serve_admin(args.admin_listen, admin.clone(), gateway.status()).await {
            Ok(task) => management.push(task),
            Err(e) => {
                eprintln!("error: {e}");
                gateway.shutdown().await;
                return ExitCode::FAILURE;
            }
        }
    }
    let (quota_stop, quota_stop_rx) = tokio::sync::watch::channel(false);
    let quotas = QuotaWiring {
        gateway: gateway.clone(),
        analytics: served.observability.analytics.clone(),
        tracker: gateway.quotas(),
        interval: args.quota_flush_interval,
        retention: args.quota_retention,
        stop: quota_stop_rx,
        tasks: std::sync::Arc::default(),
        call_log,
    };
    match (store, store_url) {
        (Some(store), _) => {
            management.push(start_management(
                &control,
                store,
                (&admin, &opened),
                args.store_poll,
                &quotas,
            ));
        }
        (None, Some(url)) => management.push(tokio::spawn(reconnect(
            control.clone(),
            url,
            (admin.clone(), opened.clone()),
            args.store_poll,
            quotas.clone(),
        ))),
        (None, None) => {}
    }
    for (name, addr) in gateway.local_addrs() {
        tracing::info!(listener = %name, %addr, "listening");
    }

    let reloader = {
        let control = control.clone();
        let access_logs = access_logs.clone();
        let tracing_state = tracing_state.clone();
        tokio::spawn(async move {
            while let Some(why) = reload_rx.recv().await {
                // Coalesce bursts of file events (editors write several times).
                tokio::time::sleep(Duration::from_millis(100)).await;
                while reload_rx.try_recv().is_ok() {}
                match load(file.as_deref(), &overrides) {
                    Ok((config, source)) => match control.set_file(config.clone()).await {
                        Ok(v) => {
                            tracing::info!(version = v, trigger = why, "reload applied");
                            if let Err(e) = access_logs.apply(&config.observability.access_log) {
                                tracing::warn!(error = %e, "the access log keeps its previous sinks");
                            }
                            if let Err(e) = tracing_state.apply(&config.observability.tracing) {
                                tracing::warn!(error = %e, "tracing keeps its previous settings");
                            }
                            if let Err(e) = save_last_good(&config, &source) {
                                tracing::warn!(error = %e, "cannot record the applied configuration");
                            }
                        }
                        Err(e) => report_reload_errors(&source.locate(e)),
                    },
                    Err(e) => report_reload_errors(&e),
                }
            }
        })
    };

    wait_for_termination().await;
    tracing::info!("shutting down: draining in-flight requests");
    reloader.abort();
    for task in management {
        task.abort();
    }
    gateway.shutdown().await;
    access_logs.shutdown().await;
    tracing_state.shutdown().await;
    // Drained: the last counts can be flushed.
    let _ = quota_stop.send(true);
    let quota_tasks = match quotas.tasks.lock() {
        Ok(mut t) => std::mem::take(&mut *t),
        Err(_) => Vec::new(),
    };
    for task in quota_tasks {
        let flush_deadline = turnpike_control::quota::DEFAULT_STORE_TIMEOUT * 2;
        if tokio::time::timeout(flush_deadline, task).await.is_err() {
            tracing::warn!("the last quota counts could not be flushed in time");
        }
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Opens the store (creating and migrating it if needed), creates the first super admin on
/// a fresh store, and reads the state to serve.
async fn open_store(url: &str) -> Result<(Store, turnpike_control::StoreState), String> {
    let store = Store::open(url).await.map_err(|e| e.to_string())?;
    match turnpike_admin::bootstrap(&store).await {
        Ok(Some(secret)) => {
            // Printed once, on the console of whoever started the first run; never logged to
            // a sink and never stored (only its hash is).
            eprintln!(
                "\nFirst run: created the super admin `admin`. Its Admin API token (shown once):\n\n    {secret}\n\nUse it as `Authorization: Bearer <token>`; `turnpike token create` makes more.\n"
            );
        }
        Ok(None) => {}
        Err(e) => return Err(format!("cannot bootstrap the store: {e}")),
    }
    let state = turnpike_control::fetch(&store)
        .await
        .map_err(|e| e.to_string())?;
    Ok((store, state))
}

/// The Admin API once the store is open; empty while it is unreachable.
type AdminSlot = std::sync::Arc<std::sync::OnceLock<axum::Router>>;

/// The store once it is open; empty while it is unreachable.
type StoreSlot = std::sync::Arc<std::sync::OnceLock<Store>>;

/// How long `/readyz` waits for the store to answer.
const STORE_READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `/readyz`'s store check: opened, and answering a version query in time.
struct StoreReady {
    store: StoreSlot,
}

impl turnpike_proxy::status::ReadinessCheck for StoreReady {
    fn name(&self) -> &'static str {
        "store"
    }

    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let Some(store) = self.store.get() else {
                return Err("the management store is unreachable".to_owned());
            };
            match tokio::time::timeout(STORE_READY_TIMEOUT, store.current_version()).await {
                Ok(Ok(_)) => Ok(()),
                // The error text can name hosts and users; this endpoint is unauthenticated.
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "readiness: the store fails");
                    Err("the management store fails".to_owned())
                }
                Err(_) => Err(format!(
                    "the management store did not answer within {}s",
                    STORE_READY_TIMEOUT.as_secs()
                )),
            }
        })
    }
}

/// Binds the Admin API listener and serves whatever `slot` holds. The status endpoints
/// (`/metrics`, `/healthz`, `/readyz`, `/version`) answer first, store or no store.
async fn serve_admin(
    addr: SocketAddr,
    slot: AdminSlot,
    status: std::sync::Arc<turnpike_proxy::status::Status>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for the Admin API on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(listener = "admin", addr = %local, "listening");
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let router = slot.get().cloned();
        let status = status.clone();
        async move {
            use axum::response::IntoResponse;
            use tower::ServiceExt;
            if let Some(resp) = status
                .respond(req.method(), req.uri().path(), req.headers())
                .await
            {
                return resp.map(axum::body::Body::new);
            }
            match router {
                Some(router) => router.oneshot(req).await.into_response(),
                None => store_unavailable(&req).into_response(),
            }
        }
    });
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the Admin API stopped");
        }
    }))
}

/// 503 in the project's error shape, while the store cannot be reached.
fn store_unavailable(
    req: &axum::extract::Request,
) -> (
    axum::http::StatusCode,
    [(&'static str, String); 1],
    axum::Json<serde_json::Value>,
) {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        [("x-request-id", request_id.clone())],
        axum::Json(serde_json::json!({"error": {
            "code": "store_unavailable",
            "message": "the management store is unreachable; the gateway serves its last saved state and changes cannot be made until the store answers",
            "request_id": request_id,
        }})),
    )
}

/// What starts the quota sync once the store is open, and what stops it at shutdown.
#[derive(Clone)]
struct QuotaWiring {
    /// The gateway whose calls analytics and the call log record (and whose upstreams
    /// alerts watch).
    gateway: std::sync::Arc<Gateway>,
    /// Analytics and alerts; read at start (changing them needs a restart).
    analytics: turnpike_model::observe::AnalyticsConfig,
    tracker: std::sync::Arc<turnpike_proxy::quota::QuotaTracker>,
    interval: Duration,
    retention: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// The call-log writer starts with the store and stops (flushing) with the quota sync.
    call_log: turnpike_model::observe::CallLogConfig,
}

fn parse_quota_retention(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < turnpike_control::quota::MIN_USAGE_RETENTION {
        return Err("must be at least 32days".into());
    }
    Ok(d)
}

fn parse_flush_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err("must be between 100ms and 1h".into());
    }
    Ok(d)
}

/// The Admin API's way to the gateway's response cache.
struct CachePurge(std::sync::Arc<Gateway>);

impl turnpike_admin::CachePurger for CachePurge {
    fn purge(
        &self,
        target: turnpike_admin::PurgeTarget,
    ) -> futures_util::future::BoxFuture<'static, serde_json::Value> {
        use turnpike_admin::PurgeTarget as T;
        use turnpike_proxy::cache::Purge;
        let purge = match target {
            T::Key(k) => Purge::Key(k),
            T::Prefix(p) => Purge::Prefix(p),
            T::Tag(t) => Purge::Tag(t),
            T::All => Purge::All,
        };
        // The store in use when the purge is asked for (a reload may replace it).
        let cache = self.0.cache();
        Box::pin(async move {
            let report = cache.purge(&purge).await;
            serde_json::json!({ "memory": report.memory, "shared": report.shared })
        })
    }
}

/// Starts following the store and puts the Admin API in its slot.
fn start_management(
    control: &std::sync::Arc<ControlPlane>,
    store: Store,
    (admin, opened): (&AdminSlot, &StoreSlot),
    poll: Duration,
    quotas: &QuotaWiring,
) -> tokio::task::JoinHandle<()> {
    let _ = opened.set(store.clone());
    let _ = admin.set(turnpike_admin::router(
        turnpike_admin::AdminState::new(store.clone())
            .with_analytics_limits(quotas.analytics.query)
            .with_call_log_search(quotas.call_log.search)
            .with_cache_purger(std::sync::Arc::new(CachePurge(quotas.gateway.clone()))),
    ));
    let sync = turnpike_control::quota::QuotaSync::with_retention(
        store.clone(),
        quotas.tracker.clone(),
        turnpike_control::quota::DEFAULT_STORE_TIMEOUT,
        quotas.retention,
    );
    let task = sync.spawn(quotas.interval, quotas.stop.clone());
    let call_log = turnpike_control::calllog::spawn(
        store.clone(),
        &quotas.call_log,
        &quotas.gateway.observer(),
        quotas.stop.clone(),
    );
    // Analytics rollups, downsampling and alerts; their flusher writes the last minutes when
    // `stop` turns true, so their tasks are awaited with the quota sync at shutdown.
    let analytics = turnpike_control::analytics::start(
        &store,
        &quotas.gateway,
        &quotas.analytics,
        &quotas.stop,
    );
    if let Ok(mut tasks) = quotas.tasks.lock() {
        tasks.push(task);
        tasks.extend(call_log.map(|(_, task)| task));
        tasks.extend(analytics.into_iter().flat_map(|a| a.tasks));
    }
    turnpike_control::spawn_sync(control.clone(), store, poll)
}

/// Retries the store until it answers, then starts management as at a normal start.
async fn reconnect(
    control: std::sync::Arc<ControlPlane>,
    url: String,
    (admin, opened): (AdminSlot, StoreSlot),
    poll: Duration,
    quotas: QuotaWiring,
) {
    let mut wait = Duration::from_millis(500);
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
        let Ok(Ok((store, state))) = tokio::time::timeout(wait * 2, open_store(&url)).await else {
            continue;
        };
        tracing::info!(
            store_version = state.version,
            "the store is reachable again"
        );
        if let Err(e) = control.set_store(&state).await {
            report_reload_errors(&e);
        }
        let _ = start_management(&control, store, (&admin, &opened), poll, &quotas).await;
        return;
    }
}

/// The store URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Keeps a copy of the configuration that is live in the data directory, so operators (and,
/// later, a node starting without its store) can see exactly what is being served. Written to
/// a temporary file and renamed, so the copy is never half-written.
fn save_last_good(config: &Config, source: &Source) -> Result<(), String> {
    let Some(dir) = &config.server.data_dir else {
        return Ok(());
    };
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data directory `{}`: {e}", dir.display()))?;
    let ext = if source.file.ends_with(".json") {
        "json"
    } else {
        "yaml"
    };
    let target = dir.join(format!("last-good-config.{ext}"));
    let tmp = dir.join(format!(".last-good-config.{ext}.tmp"));
    std::fs::write(&tmp, &source.text)
        .and_then(|()| std::fs::rename(&tmp, &target))
        .map_err(|e| format!("cannot write `{}`: {e}", target.display()))
}

fn report_reload_errors(errors: &ConfigErrors) {
    for e in &errors.0 {
        tracing::error!(error = %e, "configuration rejected; the running configuration keeps serving");
    }
}

/// Watches the configuration file's directory (editors replace files by renaming, which a
/// watch on the file itself would miss) and asks for a reload when the file changes.
fn watch(
    file: &Path,
    tx: tokio::sync::mpsc::Sender<&'static str>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let name = file.file_name()?.to_owned();
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if ev.kind.is_access() {
                return;
            }
            if ev
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
            {
                let _ = tx.try_send("file");
            }
        }
    })
    .map_err(
        |e| tracing::warn!(error = %e, "cannot watch the configuration file; SIGHUP still reloads"),
    )
    .ok()?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!(error = %e, "cannot watch the configuration directory; SIGHUP still reloads"))
        .ok()?;
    Some(watcher)
}

#[cfg(unix)]
fn spawn_sighup(tx: tokio::sync::mpsc::Sender<&'static str>) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut s) => {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    let _ = tx.try_send("SIGHUP");
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
    }
}

#[cfg(not(unix))]
fn spawn_sighup(_tx: tokio::sync::mpsc::Sender<&'static str>) {}

async fn wait_for_termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn quota_flags_refuse_values_out_of_range() {
        assert_eq!(parse_flush_interval("5s").unwrap(), Duration::from_secs(5));
        assert!(parse_flush_interval("50ms").unwrap_err().contains("100ms"));
        assert!(parse_flush_interval("2h").is_err());
        assert_eq!(
            parse_quota_retention("400days").unwrap(),
            Duration::from_secs(400 * 86_400)
        );
        assert!(
            parse_quota_retention("31days")
                .unwrap_err()
                .contains("32days")
        );
        assert!(parse_quota_retention("soon").is_err());
    }
}
