//! The wall page in a real browser: headless Chromium driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/test`) over the WebDriver protocol. The page loads with the token
//! in its fragment; events are ingested; the displayed GMV must equal their sum;
//! a rule that fires on them shows in the alert strip; after the server stops,
//! the page must show its stale state. A screenshot is
//! written to Cargo's temporary directory for integration tests
//! (`CARGO_TARGET_TMPDIR`, wherever the target directory is) as wall.png; the
//! one in docs/ was taken this way.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{order, start_node, T0_MS};

struct Driver {
    process: Child,
    base: String,
    session: String,
    client: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn installed(path: &str) -> String {
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is not installed: run scripts/test, which installs Debian's chromium and chromium-driver"
    );
    path.to_string()
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = Command::new(installed("/usr/bin/chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": installed("/usr/bin/chromium"),
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--lang=en-US",
                         "--window-size=1280,900"]
            }
        }}});
        let deadline = Instant::now() + Duration::from_secs(60);
        let session = loop {
            if let Ok(response) = client
                .post(format!("{base}/session"))
                .json(&capabilities)
                .send()
                .await
            {
                let body: Value = response.json().await.unwrap();
                match body["value"]["sessionId"].as_str() {
                    Some(session) => break session.to_string(),
                    None => panic!("chromedriver refused the session: {body}"),
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Driver {
            process,
            base,
            session,
            client,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.client.request(method.clone(), url);
        // chromedriver refuses a body on GET
        if method == reqwest::Method::POST {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        response.json::<Value>().await.unwrap()["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    /// The text of the element with `data-testid`, or of `#id`.
    async fn text(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        let Some(element) = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
        else {
            return String::new();
        };
        let text = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{element}/text"),
                json!(null),
            )
            .await;
        text.as_str().unwrap_or_default().to_string()
    }

    async fn wait_for_text(&self, css: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            last = self.text(css).await;
            if last == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let source = self
            .call(reqwest::Method::GET, "/source", json!(null))
            .await;
        let source: String = source
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(3000)
            .collect();
        panic!("{css} shows {last:?}, not {expected:?}; the page:\n{source}");
    }

    async fn screenshot(&self, path: &std::path::Path) {
        use base64_decode::decode;
        let encoded = self
            .call(reqwest::Method::GET, "/screenshot", json!(null))
            .await;
        std::fs::write(path, decode(encoded.as_str().unwrap())).unwrap();
    }
}

/// A small standard base64 decoder, so the test needs no crate for it.
mod base64_decode {
    pub fn decode(text: &str) -> Vec<u8> {
        let value = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let clean: Vec<u8> = text
            .bytes()
            .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
            .collect();
        let mut out = Vec::with_capacity(clean.len() * 3 / 4);
        for chunk in clean.chunks(4) {
            let bits = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, c)| acc | (value(*c) as u32) << (18 - 6 * i));
            for i in 0..chunk.len().saturating_sub(1) {
                out.push((bits >> (16 - 8 * i)) as u8);
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wall_shows_the_ingested_gmv_and_goes_stale_when_the_server_stops() {
    // a rule that fires on the third order: the wall shows it
    let node = start_node(|config| {
        config.alerting.tick_ms = 100;
        config.alerts = vec![tally::config::RuleConfig {
            id: "many-orders".into(),
            tenants: vec!["demo".into()],
            metric: "orders".into(),
            window: "today".into(),
            condition: tally::domain::alert::Condition::Above { value: 2.0 },
            by: None,
            min_count: 0,
            for_s: 0,
            severity: "P1".into(),
            runbook: None,
        }];
    })
    .await;
    let driver = Driver::start().await;
    driver
        .open(&format!("{}/wall#token=demo-key", node.base))
        .await;
    driver.wait_for_text("#status", "live").await;
    driver
        .wait_for_text("[data-testid=gmv-today]", "$0.00")
        .await;

    let events = [
        order("o-1", 1250, T0_MS),
        order("o-2", 800, T0_MS),
        order("o-3", 2150, T0_MS),
    ];
    assert_eq!(node.post("demo-key", &events).await.body["accepted"], 3);
    // 1250 + 800 + 2150 = 4200 cents
    driver
        .wait_for_text("[data-testid=gmv-today]", "$42.00")
        .await;
    driver.wait_for_text("#orders", "3").await;
    driver.wait_for_text("#aov", "$14.00").await;
    driver
        .wait_for_text("[data-testid=alert-rule]", "P1 many-orders")
        .await;
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    println!("screenshots in {}", target.display());
    driver.screenshot(&target.join("wall.png")).await;

    node.stop().await;
    driver.wait_for_text("#status", "not live").await;
    let banner = driver.text("[data-testid=stale]").await;
    assert!(banner.starts_with("Not live"), "{banner}");
    driver.screenshot(&target.join("wall-stale.png")).await;
}

/// The real binary frozen with SIGSTOP: its sockets stay open (as with a
/// half-open connection), no message comes, and the wall must say "stale"
/// once three heartbeats are missed, even on a quiet tenant; after SIGCONT it
/// is live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wall_goes_stale_when_heartbeats_stop_on_an_open_connection() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = common::binary_config(port, dir.path()).replace(
        "heartbeat_interval_ms = 5000",
        "heartbeat_interval_ms = 300",
    );
    assert!(config.contains("heartbeat_interval_ms = 300"));
    let config_path = dir.path().join("tally.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("log");
    let mut child = common::spawn_binary(&config_path, &log);
    let base = format!("http://127.0.0.1:{port}");
    common::wait_until_ready(&reqwest::Client::new(), &mut child, &base, &log).await;
    let driver = Driver::start().await;
    driver.open(&format!("{base}/wall#token=demo-key")).await;
    driver.wait_for_text("#status", "live").await;
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args([name, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    driver.wait_for_text("#status", "stale").await;
    let banner = driver.text("[data-testid=stale]").await;
    assert!(banner.starts_with("Not live"), "{banner}");
    signal("-CONT");
    driver.wait_for_text("#status", "live").await;
    let _ = child.kill();
    let _ = child.wait();
}

/// Money on the wall by the tenant's ISO 4217 minor digits, served by the
/// node: yen without decimals, Bahraini dinars with three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wall_shows_yen_without_decimals_and_dinars_with_three() {
    let node = start_node(|config| {
        config.tenants[0].currency = "JPY".into();
        config.tenants[1].currency = "BHD".into();
    })
    .await;
    let yen = json!({"id": "y-1", "type": "order.completed", "ts": T0_MS, "amount": 4200, "currency": "JPY"});
    let dinars = json!({"id": "d-1", "type": "order.completed", "ts": T0_MS, "amount": 4200, "currency": "BHD"});
    assert_eq!(node.post("demo-key", &[yen]).await.body["accepted"], 1);
    assert_eq!(node.post("acme-key", &[dinars]).await.body["accepted"], 1);
    let tenant = node.get(Some("acme-key"), "/v1/tenant").await;
    assert_eq!(tenant.body["currency_minor_digits"], 3);
    let driver = Driver::start().await;
    driver
        .open(&format!("{}/wall#token=demo-key", node.base))
        .await;
    driver.wait_for_text("#status", "live").await;
    driver
        .wait_for_text("[data-testid=gmv-today]", "¥4,200")
        .await;
    // another page between, so that the wall loads again (a new fragment
    // alone does not reload it)
    driver.open(&format!("{}/healthz", node.base)).await;
    driver
        .open(&format!("{}/wall#token=acme-key", node.base))
        .await;
    driver.wait_for_text("#status", "live").await;
    driver
        .wait_for_text("[data-testid=gmv-today]", "BHD 4.200")
        .await;
    node.stop().await;
}
