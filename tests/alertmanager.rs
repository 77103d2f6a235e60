//! Alerts handed to a real Alertmanager (Debian's `prometheus-alertmanager`,
//! which `scripts/test` installs; a missing binary fails this test, it does
//! not skip it), started here on loopback, after the alert fired: the node
//! tries again until it takes it, it appears in its API with the rule's
//! labels and annotations, and is gone once it resolves.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{free_port, start_node_in};
use tally::clock::ManualClock;
use tally::config::RuleConfig;
use tally::domain::alert::Condition;

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

struct Alertmanager {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_alertmanager(client: &reqwest::Client, port: u16) -> Alertmanager {
    assert!(
        std::path::Path::new(ALERTMANAGER).exists(),
        "{ALERTMANAGER} is not installed: run scripts/test, which installs Debian's prometheus-alertmanager"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: none\nreceivers:\n  - name: none\n",
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let child = Command::new(ALERTMANAGER)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(format!("{base}/-/ready")).send().await {
            if response.status().is_success() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "alertmanager not ready: {}",
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Alertmanager {
        child,
        base,
        _dir: dir,
    }
}

/// Alertmanager's active alerts, until `done` says they are as awaited.
async fn alerts_until(
    client: &reqwest::Client,
    base: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alerts: Vec<Value> = client
            .get(format!("{base}/api/v2/alerts"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done(&alerts) || Instant::now() > deadline {
            return alerts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_reaches_alertmanager_with_its_labels_and_leaves_on_resolve() {
    let client = reqwest::Client::new();
    // Alertmanager is down when the alert fires: the node tries again later
    let port = free_port();
    // Alertmanager keeps real time: this node's clock starts 31 s behind it
    // and catches up to it when the window is made to empty
    let now_ms = chrono::Utc::now().timestamp_millis() - 31_000;
    let url = format!("http://127.0.0.1:{port}");
    let node = start_node_in(
        tempfile::tempdir().unwrap(),
        ManualClock::new(now_ms),
        |config| {
            config.alerting.tick_ms = 100;
            config.alerting.alertmanager_url = url;
            config.alerts = vec![RuleConfig {
                id: "many-orders".into(),
                tenants: vec!["demo".into()],
                metric: "orders".into(),
                window: "30s".into(),
                condition: Condition::Above { value: 5.0 },
                by: None,
                min_count: 0,
                for_s: 0,
                severity: "P1".into(),
                runbook: Some("https://runbooks.example/orders".into()),
            }];
        },
    )
    .await;
    let events: Vec<Value> = (0..10)
        .map(|n| json!({"id": format!("o-{n}"), "type": "order.completed", "ts": now_ms, "amount": 100, "currency": "USD"}))
        .collect();
    assert_eq!(node.post("demo-key", &events).await.body["accepted"], 10);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let alertmanager = start_alertmanager(&client, port).await;

    let alerts = alerts_until(&client, &alertmanager.base, |alerts| !alerts.is_empty()).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let alert = &alerts[0];
    assert_eq!(
        alert["labels"],
        json!({"alertname": "many-orders", "rule": "many-orders", "severity": "P1", "tenant": "demo"})
    );
    assert_eq!(
        alert["annotations"]["runbook_url"],
        "https://runbooks.example/orders"
    );
    assert_eq!(
        alert["annotations"]["summary"],
        "orders above over 30s: 10 against baseline none, threshold 5"
    );
    assert_eq!(alert["status"]["state"], "active");

    // the 30 s window empties: resolved, and gone from Alertmanager's list
    node.clock.advance_ms(31_000);
    let alerts = alerts_until(&client, &alertmanager.base, |alerts| alerts.is_empty()).await;
    assert_eq!(alerts, Vec::<Value>::new());
    let records = node.get(Some("demo-key"), "/v1/alerts?since=0").await.body;
    let states: Vec<&str> = records["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["firing", "resolved"]);
    node.stop().await;
}
