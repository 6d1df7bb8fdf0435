//! The `turnpike` binary: command line, configuration loading, signals and hot reload.
//! The gateway itself lives in `turnpike-proxy`; this file only wires it to the process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use turnpike_model::{Config, ConfigError, ConfigErrors, Format, Source};
use turnpike_proxy::demo::DemoServer;
use turnpike_proxy::gateway::Gateway;

/// The quickstart configuration, used when no `--config` is given.
const QUICKSTART: &str = include_str!("../../../examples/quickstart.yaml");

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
    /// Directory for runtime state.
    #[arg(long, env = "TURNPIKE_DATA_DIR")]
    data_dir: Option<String>,
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

    let gateway = match Gateway::start(&config).await {
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
    for (name, addr) in gateway.local_addrs() {
        tracing::info!(listener = %name, %addr, "listening");
    }

    let reloader = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            while let Some(why) = reload_rx.recv().await {
                // Coalesce bursts of file events (editors write several times).
                tokio::time::sleep(Duration::from_millis(100)).await;
                while reload_rx.try_recv().is_ok() {}
                match load(file.as_deref(), &overrides) {
                    Ok((config, source)) => match gateway.reload(&config).await {
                        Ok(v) => {
                            tracing::info!(version = v, trigger = why, "reload applied");
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
    gateway.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
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
