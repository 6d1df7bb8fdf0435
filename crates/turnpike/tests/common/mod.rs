//! The harness for tests of the real `turnpike` binary: a child process whose log lines
//! arrive on a channel, and a blocking HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_turnpike");

pub fn config(target: SocketAddr) -> String {
    format!(
        "server:\n  listeners: [{{name: public, address: \"127.0.0.1:0\"}}]\n  drain_timeout: 10s\n\
         upstreams:\n  - name: up\n    targets: [{{address: \"{target}\"}}]\n\
         routes:\n  - name: all\n    paths: [{{prefix: /}}]\n    upstream: up\n"
    )
}

/// Minimal blocking HTTP/1.1 GET: (status, headers+body text).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
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

pub fn served_by(addr: SocketAddr) -> Option<String> {
    let (_, text) = http_get(addr, "/").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("x-served-by: ").map(|v| v.trim().to_owned()))
}

/// The gateway process, with its stderr log lines arriving on a channel.
pub struct Gateway {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    pub addr: SocketAddr,
    _data: tempfile::TempDir,
}

impl Gateway {
    pub fn start(config_path: &Path) -> Self {
        Self::start_with(config_path, &[])
    }

    /// Starts with extra environment variables.
    /// Unless `env` says otherwise, the gateway serves the file alone (no store) and keeps
    /// its state in a temporary directory.
    pub fn start_with(config_path: &Path, env: &[(&str, &str)]) -> Self {
        let data = tempfile::tempdir().expect("data dir");
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config_path)
            .args(["--log-format", "json", "--log-level", "info"])
            .env("TURNPIKE_STORE", "none")
            .env("TURNPIKE_DATA_DIR", data.path())
            .env("TURNPIKE_ADMIN_LISTEN", "127.0.0.1:0")
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
            _data: data,
        };
        let line = gw
            .wait_for(
                "\"listening\",\"listener\":\"public\"",
                Duration::from_secs(30),
            )
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
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> Option<String> {
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

    pub fn signal(&self, sig: &str) {
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

pub fn poll_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A blocking HTTP/1.1 request with a JSON body and extra headers: (status, body).
pub fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body = body.to_string();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    write!(s, "{head}\r\n{body}").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let text = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status,
        serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
    )
}

/// The address a listener named `name` announced in the JSON log.
pub fn listener_addr(gw: &mut Gateway, name: &str) -> SocketAddr {
    let line = gw
        .wait_for(
            &format!("\"listening\",\"listener\":\"{name}\""),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("listener {name} never listened"));
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    v["fields"]["addr"].as_str().unwrap().parse().unwrap()
}
