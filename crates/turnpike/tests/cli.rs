//! The real `turnpike` binary: validation errors, hot reload on file change and SIGHUP, and
//! graceful drain on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Gateway, config, http_get, poll_until, runtime, served_by};
use turnpike_proxy::demo::DemoServer;

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

/// Runs a store command against the embedded store in `data`: (exit code, stdout, stderr).
fn store_command(data: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("TURNPIKE_DATA_DIR", data)
        .env_remove("TURNPIKE_STORE")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bootstrap_once_then_tokens_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let (code, out, err) = store_command(dir.path(), args);
        (code, out.trim().to_owned(), err)
    };
    let (code, first, _) = run(&["admin", "bootstrap"]);
    assert_eq!(code, Some(0));
    assert!(first.starts_with("tp_"), "{first}");
    assert!(dir.path().join("turnpike.db").exists());

    let (code, out, err) = run(&["admin", "bootstrap"]);
    assert_eq!(code, Some(1));
    assert!(out.is_empty() && err.contains("already has users"), "{err}");

    let (code, second, _) = run(&["token", "create", "--name", "ci", "--ttl", "1h"]);
    assert_eq!(code, Some(0));
    assert!(second.starts_with("tp_") && second != first, "{second}");

    let (code, _, err) = run(&["token", "create", "--user", "nobody"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nobody"), "{err}");
}

#[test]
fn export_and_apply_round_trip_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| store_command(dir.path(), args);
    let doc = dir.path().join("state.yaml");
    std::fs::write(
        &doc,
        "version: 1\nteams:\n  - name: acme\nupstreams:\n  - team: acme\n    name: backend\n    targets: [{address: \"127.0.0.1:9\"}]\n",
    )
    .unwrap();
    let path = doc.to_str().unwrap();

    let (code, out, _) = run(&["apply", "-f", path, "--dry-run"]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "+ team acme\n+ upstream acme/backend\n");
    let (code, out, _) = run(&["apply", "-f", path]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "+ team acme\n+ upstream acme/backend\n")
    );
    let (code, out, err) = run(&["apply", "-f", path]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
    assert!(err.contains("changed 0 object(s)"), "{err}");

    let (code, exported, _) = run(&["export"]);
    assert_eq!(code, Some(0));
    assert!(exported.contains("name: backend"), "{exported}");
    std::fs::write(&doc, &exported).unwrap();
    let (code, out, _) = run(&["apply", "-f", path]);
    assert_eq!((code, out.as_str()), (Some(0), ""));

    std::fs::write(
        &doc,
        "version: 1\nteams:\n  - name: acme\n    colour: red\n",
    )
    .unwrap();
    let (code, _, err) = run(&["apply", "-f", path]);
    assert_eq!(code, Some(1));
    assert!(err.contains("teams[0]") && err.contains("colour"), "{err}");
}
