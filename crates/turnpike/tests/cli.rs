//! The real `turnpike` binary: validation errors, hot reload on file change and SIGHUP, and
//! graceful drain on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use turnpike_proxy::demo::DemoServer;

const BIN: &str = env!("CARGO_BIN_EXE_turnpike");

fn config(target: SocketAddr) -> String {
    format!(
        "server:\n  listeners: [{{name: public, address: \"127.0.0.1:0\"}}]\n  drain_timeout: 10s\n\
         upstreams:\n  - name: up\n    targets: [{{address: \"{target}\"}}]\n\
         routes:\n  - name: all\n    paths: [{{prefix: /}}]\n    upstream: up\n"
    )
}

/// Minimal blocking HTTP/1.1 GET: (status, headers+body text).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, out))
}

fn served_by(addr: SocketAddr) -> Option<String> {
    let (_, text) = http_get(addr, "/").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("x-served-by: ").map(|v| v.trim().to_owned()))
}

/// The gateway process, with its stderr log lines arriving on a channel.
struct Gateway {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    addr: SocketAddr,
}

impl Gateway {
    fn start(config_path: &Path) -> Self {
        Self::start_with(config_path, &[])
    }

    /// Starts with extra environment variables.
    fn start_with(config_path: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config_path)
            .args(["--log-format", "json", "--log-level", "info"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn turnpike");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut gw = Self {
            child,
            lines,
            seen: Vec::new(),
            addr: "0.0.0.0:0".parse().expect("addr"),
        };
        let line = gw
            .wait_for("\"listening\"", Duration::from_secs(30))
            .expect("gateway never listened");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        gw.addr = v["fields"]["addr"]
            .as_str()
            .expect("addr field")
            .parse()
            .expect("socket addr");
        gw
    }

    /// Waits for a log line containing `needle` (including lines already seen).
    fn wait_for(&mut self, needle: &str, within: Duration) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn poll_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Writes `text` to `dir/name` and runs `turnpike validate` on it: (exit code, stdout, stderr).
fn validate_file(dir: &Path, name: &str, text: &str) -> (Option<i32>, String, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_names_file_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = validate_file(
        dir.path(),
        "bad.yaml",
        "upstreams:\n  - name: up\n    targets: [{address: \"127.0.0.1:9\"}]\nroutes:\n  - name: r\n    paths: [{regex: \"(unclosed\"}]\n    upstream: nowhere\n",
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("bad.yaml:7:")
            && err.contains("routes[0].upstream")
            && err.contains("unknown upstream `nowhere`"),
        "{err}"
    );

    let (code, out, err) = validate_file(
        dir.path(),
        "good.json",
        r#"{"upstreams":[{"name":"up","targets":[{"address":"127.0.0.1:9"}]}],"routes":[{"name":"r","paths":[{"prefix":"/"}],"upstream":"up"}]}"#,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (1 routes"), "{out}");

    // A regex that does not compile is caught by the compile step and located.
    let (code, _, err) = validate_file(
        dir.path(),
        "regex.yaml",
        "upstreams:\n  - name: up\n    targets: [{address: \"127.0.0.1:9\"}]\nroutes:\n  - name: r\n    paths:\n      - regex: \"(unclosed\"\n    upstream: up\n",
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("regex.yaml:7:") && err.contains("routes[0].paths[0]"),
        "{err}"
    );
}

#[test]
fn version_prints() {
    let out = Command::new(BIN).arg("version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("turnpike "));
}

#[test]
fn reloads_on_file_change_and_sighup_rejects_bad_edits() {
    let rt = runtime();
    let a = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "a"))
        .unwrap();
    let b = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "b"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnpike.yaml");
    std::fs::write(&path, config(a.local_addr())).unwrap();
    let mut gw = Gateway::start(&path);
    assert_eq!(served_by(gw.addr).as_deref(), Some("a"));

    // A saved change is picked up by the file watcher.
    std::fs::write(&path, config(b.local_addr())).unwrap();
    assert!(
        poll_until(Duration::from_secs(20), || served_by(gw.addr).as_deref()
            == Some("b")),
        "file change not applied"
    );

    // A broken edit is rejected with file and line; the running config keeps serving.
    std::fs::write(
        &path,
        format!(
            "{}  - name: broken\n    upstream: missing\n",
            config(b.local_addr())
        ),
    )
    .unwrap();
    let line = gw
        .wait_for("configuration rejected", Duration::from_secs(20))
        .expect("no rejection logged");
    assert!(
        line.contains("turnpike.yaml:") && line.contains("unknown upstream"),
        "{line}"
    );
    assert_eq!(served_by(gw.addr).as_deref(), Some("b"));

    // SIGHUP reloads too (the file is valid again and unchanged since the signal).
    std::fs::write(&path, config(a.local_addr())).unwrap();
    assert!(poll_until(Duration::from_secs(20), || served_by(gw.addr)
        .as_deref()
        == Some("a")));
    gw.signal("-HUP");
    assert!(
        gw.wait_for("\"trigger\":\"SIGHUP\"", Duration::from_secs(20))
            .is_some(),
        "SIGHUP did not reload"
    );
    assert_eq!(served_by(gw.addr).as_deref(), Some("a"));
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let rt = runtime();
    let up = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "up"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnpike.yaml");
    std::fs::write(&path, config(up.local_addr())).unwrap();
    let mut gw = Gateway::start(&path);
    let addr = gw.addr;

    let slow = std::thread::spawn(move || http_get(addr, "/delay/1500"));
    assert!(
        poll_until(Duration::from_secs(10), || up.requests() >= 1),
        "slow request never reached the upstream"
    );
    gw.signal("-TERM");
    let (status, _) = slow.join().unwrap().expect("in-flight request was cut");
    assert_eq!(status, 200, "in-flight request must complete during drain");
    assert!(
        gw.wait_for("\"stopped\"", Duration::from_secs(20))
            .is_some()
    );
    let exit = gw.child.wait().unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

#[test]
fn listen_overrides_by_name_and_rejects_unknown_names() {
    let rt = runtime();
    let up = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "up"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnpike.yaml");
    // The file asks for a fixed port; the override by name moves it to port 0.
    std::fs::write(
        &path,
        config(up.local_addr()).replace("127.0.0.1:0", "127.0.0.1:1"),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", "nosuch=127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("no listener named `nosuch`"), "{err}");

    // Through the environment this time; the override moves the listener to a free port.
    let gw = Gateway::start_with(&path, &[("TURNPIKE_LISTEN", "public=127.0.0.1:0")]);
    assert_ne!(gw.addr.port(), 1, "override not applied");
    assert_eq!(served_by(gw.addr).as_deref(), Some("up"));
}

#[test]
fn data_dir_keeps_the_live_configuration() {
    let rt = runtime();
    let a = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "a"))
        .unwrap();
    let b = rt
        .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), "b"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let path = dir.path().join("turnpike.yaml");
    std::fs::write(&path, config(a.local_addr())).unwrap();
    let data_str = data.to_str().unwrap().to_owned();
    let mut gw = Gateway::start_with(&path, &[("TURNPIKE_DATA_DIR", data_str.as_str())]);
    let saved = data.join("last-good-config.yaml");
    assert_eq!(
        std::fs::read_to_string(&saved).unwrap(),
        config(a.local_addr())
    );

    // A valid edit replaces the copy; a rejected one leaves it alone.
    std::fs::write(&path, config(b.local_addr())).unwrap();
    let applied = gw.wait_for("reload applied", Duration::from_secs(20));
    assert!(applied.is_some(), "{:#?}", gw.seen);
    assert_eq!(served_by(gw.addr).as_deref(), Some("b"));
    assert!(poll_until(
        Duration::from_secs(10),
        || std::fs::read_to_string(&saved).ok() == Some(config(b.local_addr()))
    ));
    std::fs::write(&path, "routes: [{name: r, upstream: missing}]\n").unwrap();
    assert!(
        gw.wait_for("configuration rejected", Duration::from_secs(20))
            .is_some()
    );
    assert_eq!(
        std::fs::read_to_string(&saved).unwrap(),
        config(b.local_addr())
    );
}
