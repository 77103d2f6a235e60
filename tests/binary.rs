//! The `tally` binary as a newcomer runs it: from a fresh directory holding only
//! `config/default.toml`, on its default address, serving the README's curl
//! session unchanged; `check-config`; refusing an invalid config; SIGTERM.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const README: &str = include_str!("../README.md");
const DEFAULT_TOML: &str = include_str!("../config/default.toml");

fn tally(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command.current_dir(dir);
    // the test checks the defaults, not whatever the shell running it overrides
    for (name, _) in std::env::vars() {
        if name.starts_with("TALLY_") {
            command.env_remove(name);
        }
    }
    command
}

fn fresh_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/default.toml"), DEFAULT_TOML).unwrap();
    dir
}

/// The shell block between the readme-session markers.
fn readme_session() -> String {
    let start = README
        .find("<!-- readme-session:start -->")
        .expect("session start marker");
    let end = README
        .find("<!-- readme-session:end -->")
        .expect("session end marker");
    let block = &README[start..end];
    let body_start = block.find("```sh\n").expect("sh block") + "```sh\n".len();
    let body_end = block[body_start..].find("```").expect("end of sh block") + body_start;
    block[body_start..body_end].to_string()
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

/// Waits (bounded) until the node answers /readyz, or fails with its stderr.
fn wait_ready(child: &mut Child, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tally exited early ({status}): {}", stderr_of(child));
        }
        let probe = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{addr}/readyz"),
            ])
            .output()
            .expect("curl runs (scripts/test installs it)");
        if probe.stdout == b"200" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tally did not become ready on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap()
}

#[test]
fn the_readme_session_runs_against_a_fresh_node() {
    let dir = fresh_dir();
    let mut node = tally(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_ready(&mut node, "127.0.0.1:7700");

    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &readme_session()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let replies: Vec<Value> = serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        replies.len(),
        3,
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(
        replies[0],
        json!({"accepted": 3, "duplicates": 1, "errors": [], "late": 0, "quarantined": 0, "rejected": 0})
    );
    assert_eq!(replies[1]["tenant"], "demo");
    assert_eq!(
        replies[1]["windows"]["today"],
        json!({"count": 3, "value": 4200})
    );
    assert_eq!(replies[1]["windows"]["15m"]["value"], 4200);
    assert_eq!(
        replies[2]["values"],
        json!({
            "__none__": {"windows": {"today": {"count": 1, "value": 2150}}},
            "ios": {"windows": {"today": {"count": 1, "value": 1250}}},
            "web": {"windows": {"today": {"count": 1, "value": 800}}},
        })
    );
    // the README shows this exact ingest reply
    assert!(README.contains(&replies[0].to_string()));

    let status = terminate(&mut node);
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    let log = stderr_of(&mut node);
    assert!(log.contains("tally stopped"), "{log}");
}

#[test]
fn check_config_accepts_the_default_and_lists_every_problem() {
    let dir = fresh_dir();
    let ok = tally(dir.path()).arg("check-config").output().unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        "config/default.toml: ok\n"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"nowhere\"\n[[tenants]]\nid = \"x\"\napi_keys = [\"k\"]\ncurrency = \"usd\"\ntimezone = \"Mars/Base\"\n",
    )
    .unwrap();
    let checked = tally(dir.path())
        .args(["check-config", "--config", "bad.toml"])
        .output()
        .unwrap();
    assert_eq!(checked.status.code(), Some(2));
    let errors = String::from_utf8_lossy(&checked.stderr).to_string();
    assert!(errors.contains("3 problem(s)"), "{errors}");
    for path in [
        "server.listen",
        "tenants[0].currency",
        "tenants[0].timezone",
    ] {
        assert!(
            errors.contains(&format!("  {path}: ")),
            "{path} missing from: {errors}"
        );
    }

    // serve refuses the same file with the same errors
    let served = tally(dir.path())
        .args(["serve", "--config", "bad.toml"])
        .output()
        .unwrap();
    assert_eq!(served.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&served.stderr), errors);

    // an override that names no key is refused with its variable's name
    let typo = tally(dir.path())
        .arg("check-config")
        .env("TALLY_SERVER__LISTN", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(typo.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&typo.stderr).contains("unknown field `listn`"));
}

#[test]
fn serve_demo_generates_traffic_for_the_demo_tenant() {
    let dir = fresh_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut node = tally(dir.path())
        .args(["serve", "--demo"])
        .env("TALLY_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_ready(&mut node, &addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new("curl")
            .args([
                "-s",
                "-H",
                "Authorization: Bearer demo-key",
                &format!("http://{addr}/v1/metrics/orders?window=today"),
            ])
            .output()
            .unwrap();
        let reply: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        if reply["windows"]["today"]["value"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "--demo produced no orders: {reply}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(terminate(&mut node).success());
}
