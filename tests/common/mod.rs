//! A real node on 127.0.0.1:0 with a manual clock, and a small HTTP client.
#![allow(dead_code)]

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;

use tally::app::{start, RunningNode};
use tally::clock::ManualClock;
use tally::config::{Config, TenantConfig};

/// 2025-11-22T10:00:00Z
pub const T0_MS: i64 = 1_763_805_600_000;
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

pub struct TestNode {
    pub base: String,
    pub clock: ManualClock,
    pub running: Option<RunningNode>,
    pub client: reqwest::Client,
    _data: tempfile::TempDir,
}

/// A stopped node's data directory and clock, to start it again.
pub struct Stopped {
    pub data: tempfile::TempDir,
    pub clock: ManualClock,
}

pub struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<String>,
    pub body: Value,
}

/// The default config plus a second tenant `acme` (EUR, Berlin) and an admin key.
pub fn test_config() -> Config {
    let mut config = Config::parse(DEFAULT_TOML, Vec::new()).expect("default config is valid");
    config.server.listen = "127.0.0.1:0".into();
    config.actors.shards = 2;
    config.admin.api_keys = vec!["admin-key".into()];
    config.tenants.push(TenantConfig {
        id: "acme".into(),
        api_keys: vec!["acme-key".into()],
        currency: "EUR".into(),
        timezone: "Europe/Berlin".into(),
    });
    config
}

pub async fn start_node(tweak: impl FnOnce(&mut Config)) -> TestNode {
    start_node_in(tempfile::tempdir().unwrap(), ManualClock::new(T0_MS), tweak).await
}

/// A node over `data` (which it keeps), e.g. to restart on the same directory.
pub async fn start_node_in(
    data: tempfile::TempDir,
    clock: ManualClock,
    tweak: impl FnOnce(&mut Config),
) -> TestNode {
    let mut config = test_config();
    config.storage.data_dir = data.path().to_path_buf();
    tweak(&mut config);
    assert_eq!(config.validate(), vec![], "test config must be valid");
    let running = start(config, Arc::new(clock.clone())).await.unwrap();
    TestNode {
        base: format!("http://{}", running.local_addr),
        clock,
        running: Some(running),
        client: reqwest::Client::new(),
        _data: data,
    }
}

impl TestNode {
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().unwrap().to_string());
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            retry_after,
            body,
        }
    }

    pub async fn post_raw(
        &self,
        key: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut request = self
            .client
            .post(format!("{}/v1/events", self.base))
            .header("content-type", content_type)
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        self.send(request).await
    }

    /// Posts events as NDJSON, one line each.
    pub async fn post(&self, key: &str, events: &[Value]) -> Reply {
        let body: Vec<String> = events.iter().map(|event| event.to_string()).collect();
        self.post_raw(Some(key), "application/x-ndjson", body.join("\n"))
            .await
    }

    pub async fn get(&self, key: Option<&str>, path: &str) -> Reply {
        let mut request = self.client.get(format!("{}{}", self.base, path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        self.send(request).await
    }

    pub async fn call(&self, method: reqwest::Method, key: &str, path: &str) -> Reply {
        let request = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(key);
        self.send(request).await
    }

    /// GET /v1/metrics for a key, asserting 200.
    pub async fn metrics(&self, key: &str) -> Value {
        let reply = self.get(Some(key), "/v1/metrics").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Graceful stop that keeps the data directory for a restart.
    pub async fn stop_keeping_data(mut self) -> Stopped {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        Stopped {
            data: self._data,
            clock: self.clock,
        }
    }

    /// Crash-like stop (no final snapshot) that keeps the data directory.
    pub async fn halt_keeping_data(mut self) -> Stopped {
        if let Some(running) = self.running.take() {
            running.halt().await;
        }
        Stopped {
            data: self._data,
            clock: self.clock,
        }
    }

    pub fn recovery(&self) -> &tally::storage::recovery::RecoveryReport {
        &self.running.as_ref().unwrap().recovery
    }
}

pub fn order(id: &str, amount: i64, ts_ms: i64) -> Value {
    serde_json::json!({"id": id, "type": "order.completed", "ts": ts_ms, "amount": amount, "currency": "USD"})
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until a `tally` process answers `/readyz`; panics with its log if it
/// exits first or is not ready within 60 s.
pub async fn wait_until_ready(
    client: &reqwest::Client,
    child: &mut std::process::Child,
    base: &str,
    log: &std::path::Path,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "tally exited ({status}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Ok(response) = client.get(format!("{base}/readyz")).send().await {
            if response.status().is_success() {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tally did not become ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The real `tally` binary serving `config_path`, its stderr appended to
/// `log`, with no `TALLY_` override from the test's environment.
pub fn spawn_binary(config_path: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TALLY_") {
            command.env_remove(name);
        }
    }
    command
        .arg("--config")
        .arg(config_path)
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap()
}

/// `kill -9`, and waits for the process to be gone.
pub fn kill_9(child: &mut std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = child.wait();
}

/// The default config listening on `port` with its data under `dir`.
pub fn binary_config(port: u16, dir: &std::path::Path) -> String {
    let config = DEFAULT_TOML
        .replace(
            "listen = \"127.0.0.1:7700\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        .replace(
            "data_dir = \"./data\"",
            &format!("data_dir = {:?}", dir.join("data")),
        );
    assert!(
        config.contains(&format!("127.0.0.1:{port}")),
        "the test's config overrides apply"
    );
    config
}

/// A live WebSocket client (tokio-tungstenite).
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A live session of `key` on `base` that sends `subscribe` first.
pub async fn subscribe_live(base: &str, key: &str, subscribe: &Value) -> Socket {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/v1/live", base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(
            subscribe.to_string().into(),
        ))
        .await
        .unwrap();
    socket
}

/// The next JSON message within `wait` (pings and heartbeats skipped), or
/// `None`.
pub async fn next_within(socket: &mut Socket, wait: std::time::Duration) -> Option<Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .ok()??;
        match message.unwrap() {
            Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] != "heartbeat" {
                    return Some(value);
                }
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// An enrichment on table `stores`: an event's `store` dim adds its `region`,
/// which `gmv` breaks down by.
pub fn with_stores(config: &mut Config) {
    config.enrichments = vec![tally::config::EnrichmentConfig {
        table: "stores".into(),
        key: "store".into(),
        adds: vec!["region".into()],
        on_miss: "quarantine".into(),
    }];
    for metric in &mut config.metrics {
        if metric.name == "gmv" {
            metric.dims.push("region".into());
        }
    }
}

/// Sends `body` to `path` of demo's lookup tables with `method` (PUT or
/// PATCH) and its content type.
pub async fn put_table(
    node: &TestNode,
    method: reqwest::Method,
    path: &str,
    content_type: &str,
    body: &str,
) -> Reply {
    let request = node
        .client
        .request(method, format!("{}{path}", node.base))
        .bearer_auth("demo-key")
        .header("content-type", content_type)
        .body(body.to_string());
    node.send(request).await
}
