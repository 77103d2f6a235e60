//! kill -9 cycles against the real `tally` binary (docs/architecture.md, invariants 1-3).
//!
//! Producers post batches concurrently and, like real producers, retry every
//! batch that was not acknowledged (the same ids and times) until it is. The
//! node is SIGKILLed at random moments and restarted on the same data directory
//! (snapshots every second; kills up to 3 s after start, so recovery runs from
//! snapshots plus the log after them, and the test checks that it did). Two
//! tenants with their own producers share the log. At the end every window of
//! `gmv` and `orders` of both must equal a reference model fed exactly the
//! acknowledged events: nothing lost, nothing counted twice.
//!
//! `CRASH_CYCLES` sets the number of kills (default 20) and `CRASH_SEED` the
//! seed of the kill moments; see docs/durability.md.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

mod common;

use common::{free_port, wait_until_ready};

/// (tenant, key, currency) of each producer.
const PRODUCERS: [(&str, &str, &str); 3] = [
    ("demo", "demo-key", "USD"),
    ("demo", "demo-key", "USD"),
    ("acme", "acme-key", "EUR"),
];
const EVENTS_PER_BATCH: i64 = 20;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A small deterministic generator for the kill moments.
struct Lcg(u64);

impl Lcg {
    fn next_in(&mut self, low: u64, high: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        low + (self.0 >> 33) % (high - low)
    }
}

struct NodeProcess {
    child: Child,
}

fn spawn_node(dir: &std::path::Path, port: u16, log: &std::path::Path) -> NodeProcess {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    // only the overrides set here: the shell's TALLY_* would change the node
    for (name, _) in std::env::vars() {
        if name.starts_with("TALLY_") {
            command.env_remove(name);
        }
    }
    let child = command
        .current_dir(dir)
        .env("TALLY_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("TALLY_STORAGE__SNAPSHOT_INTERVAL_S", "1")
        // long runs remember millions of ids; the default table (2 M) would fill
        .env("TALLY_INGEST__DEDUP_TABLE_BYTES_MAX", "6400000000")
        .env("RUST_LOG", "warn,tally::app=info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    NodeProcess { child }
}

fn kill_9(node: &mut NodeProcess) {
    let status = Command::new("kill")
        .args(["-9", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = node.child.wait();
}

#[derive(Debug, Clone)]
struct SentEvent {
    ts_ms: i64,
    amount: i64,
}

/// Posts batches until told to stop, retrying each until it is acknowledged.
async fn produce(
    producer: usize,
    base: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<SentEvent>>>,
) {
    let (_, key, currency) = PRODUCERS[producer];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut batch = 0i64;
    while !stop.load(Ordering::SeqCst) {
        let created_ms = wall_ms();
        let events: Vec<(String, SentEvent)> = (0..EVENTS_PER_BATCH)
            .map(|i| {
                let id = format!("p{producer}-b{batch}-e{i}");
                let amount = (producer as i64 * 7919 + batch * 31 + i * 17) % 9973 + 1;
                (
                    id,
                    SentEvent {
                        ts_ms: created_ms - i * 37,
                        amount,
                    },
                )
            })
            .collect();
        let body: Vec<String> = events
            .iter()
            .map(|(id, event)| {
                json!({"id": id, "type": "order.completed", "ts": event.ts_ms, "amount": event.amount, "currency": currency})
                    .to_string()
            })
            .collect();
        let body = body.join("\n");
        loop {
            let response = client
                .post(format!("{base}/v1/events"))
                .bearer_auth(key)
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await;
            if let Ok(response) = response {
                if response.status().is_success() {
                    if let Ok(reply) = response.json::<Value>().await {
                        let accepted = reply["accepted"].as_i64().unwrap();
                        let duplicates = reply["duplicates"].as_i64().unwrap();
                        assert_eq!(accepted + duplicates, EVENTS_PER_BATCH, "{reply}");
                        acked
                            .lock()
                            .unwrap()
                            .extend(events.iter().map(|(_, event)| event.clone()));
                        break;
                    }
                }
            }
            // not acknowledged (killed, refused, 503): retry the same batch
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        batch += 1;
        // paced (about 1 000 events/s a producer), so that long runs stay bounded
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The reference: sums and counts of the acknowledged events by window at `at`.
fn expected(events: &[SentEvent], at_ms: i64) -> Value {
    let at_s = at_ms.div_euclid(1000);
    let day_start_s = at_s.div_euclid(86_400) * 86_400; // both tenants are UTC
    let window = |keep: &dyn Fn(i64) -> bool| {
        let mut sum = 0i64;
        let mut count = 0i64;
        for event in events {
            if keep(event.ts_ms.div_euclid(1000)) {
                sum += event.amount;
                count += 1;
            }
        }
        (sum, count)
    };
    let (s30, c30) = window(&|s| s > at_s - 30 && s <= at_s);
    let (p30, pc30) = window(&|s| s > at_s - 60 && s <= at_s - 30);
    let (s15, c15) = window(&|s| s > at_s - 900 && s <= at_s);
    let (p15, pc15) = window(&|s| s > at_s - 1800 && s <= at_s - 900);
    let (today, today_count) = window(&|s| s >= day_start_s && s <= at_s);
    json!({
        "gmv": {"30s": {"value": s30, "count": c30, "prev": p30, "prev_count": pc30},
                "15m": {"value": s15, "count": c15, "prev": p15, "prev_count": pc15},
                "today": {"value": today, "count": today_count}},
        "orders": {"30s": {"value": c30, "prev": pc30}, "15m": {"value": c15, "prev": pc15},
                   "today": {"value": today_count}},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_cycles_lose_nothing_and_count_nothing_twice() {
    let cycles = env_number("CRASH_CYCLES", 20);
    let mut rng = Lcg(env_number("CRASH_SEED", 20261122));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    let config = format!(
        "{}\n[[tenants]]\nid = \"acme\"\napi_keys = [\"acme-key\"]\ncurrency = \"EUR\"\n",
        include_str!("../config/default.toml")
    );
    std::fs::write(dir.path().join("config/default.toml"), config).unwrap();
    let log = dir.path().join("tally.log");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    let stop = Arc::new(AtomicBool::new(false));
    let acked_demo = Arc::new(Mutex::new(Vec::new()));
    let acked_acme = Arc::new(Mutex::new(Vec::new()));
    let mut producers = Vec::new();
    for (p, (tenant, _, _)) in PRODUCERS.iter().enumerate() {
        let acked = if *tenant == "acme" {
            &acked_acme
        } else {
            &acked_demo
        };
        producers.push(tokio::spawn(produce(
            p,
            base.clone(),
            Arc::clone(&stop),
            Arc::clone(acked),
        )));
    }

    for _ in 0..cycles {
        let mut node = spawn_node(dir.path(), port, &log);
        wait_until_ready(&client, &mut node.child, &base, &log).await;
        tokio::time::sleep(Duration::from_millis(rng.next_in(100, 3000))).await;
        kill_9(&mut node);
    }

    // a last start: producers finish their batches, then the windows are checked
    let mut node = spawn_node(dir.path(), port, &log);
    wait_until_ready(&client, &mut node.child, &base, &log).await;
    stop.store(true, Ordering::SeqCst);
    for producer in producers {
        // a producer that cannot get its last batch acknowledged fails the run
        tokio::time::timeout(Duration::from_secs(120), producer)
            .await
            .expect("a producer's last batch was not acknowledged within 120 s")
            .unwrap();
    }
    let mut acknowledged = 0;
    for (tenant, key, acked) in [
        ("demo", "demo-key", &acked_demo),
        ("acme", "acme-key", &acked_acme),
    ] {
        let reply: Value = client
            .get(format!("{base}/v1/metrics"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let at_ms = reply["at"].as_i64().unwrap();
        let events = acked.lock().unwrap().clone();
        assert!(!events.is_empty(), "no batch of {tenant} got through");
        acknowledged += events.len();
        let actual = json!({
            "gmv": reply["metrics"]["gmv"]["windows"],
            "orders": reply["metrics"]["orders"]["windows"],
        });
        assert_eq!(
            actual,
            expected(&events, at_ms),
            "{tenant} after {cycles} kills, {} events acknowledged",
            events.len()
        );
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let recoveries: Vec<&str> = log_text
        .lines()
        .filter(|line| line.contains(" recovered "))
        .collect();
    assert_eq!(recoveries.len() as u64, cycles + 1, "every start recovers");
    if cycles >= 5 {
        // the kills reached nodes that had snapshotted and logged after it
        let from_snapshot_and_log = recoveries
            .iter()
            .filter(|line| line.contains("snapshot=Some(") && !line.contains("replayed=0 "))
            .count();
        assert!(
            from_snapshot_and_log > 0,
            "no recovery used a snapshot and the log:\n{}",
            recoveries.join("\n")
        );
    }
    kill_9(&mut node);
    eprintln!("{cycles} kill -9 cycles, {acknowledged} events acknowledged, windows exact");
}
