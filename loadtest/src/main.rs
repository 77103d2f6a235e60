//! Load scenarios against a tally node that this program starts itself (a
//! separate process, on loopback, with its own data directory).
//!
//! `live`: N WebSocket clients subscribe to `orders` (today) at `interval_ms`
//! while batches of 1 000 events are posted at a target rate; for every batch
//! and every client, the time from the batch's acknowledgement to the first
//! update showing it is recorded. Reports events/s acknowledged, p50/p99/max of
//! that latency, and the node's CPU and resident memory over the run (from
//! /proc). The node's final count must equal what was acknowledged.
//!
//! The remaining scenarios (ingest throughput, Redis side by side) belong to
//! the benchmarks issue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(name = "tally-loadtest")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Event acknowledged → WebSocket update received, with N clients.
    Live {
        /// The tally binary to start (build it with `cargo build --release`).
        #[arg(long, default_value = "target/release/tally")]
        tally: String,
        /// The config the node starts with.
        #[arg(long, default_value = "config/default.toml")]
        config: String,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Target events per second (batches of 1 000).
        #[arg(long, default_value_t = 100_000)]
        rate: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

const BATCH: u64 = 1000;

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name: utime is the 14th, stime the 15th
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn resident_mib(pid: u32) -> f64 {
    tally::telemetry::resident_bytes(Some(pid)).unwrap_or(0.0) / (1024.0 * 1024.0)
}

struct Node {
    child: tokio::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

async fn start_node(tally: &str, config: &str, clients: usize) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(tally)
        .args(["serve", "--config", config])
        .env("TALLY_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("TALLY_STORAGE__DATA_DIR", dir.path())
        .env(
            "TALLY_LIVE__SESSIONS_PER_TENANT_MAX",
            (clients + 10).to_string(),
        )
        .env("TALLY_INGEST__DEDUP_IDS_MAX", "100000000")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("the tally binary starts (cargo build --release first)");
    let base = format!("127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(response) = client.get(format!("http://{base}/readyz")).send().await {
            if response.status().is_success() {
                return Node {
                    child,
                    base,
                    _dir: dir,
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node did not become ready");
}

/// `(events acknowledged so far, when)`, in acknowledgement order.
type Acks = Arc<Mutex<Vec<(u64, Instant)>>>;

async fn client(
    base: String,
    interval_ms: u64,
    acks: Acks,
    latencies: Arc<Mutex<Histogram<u64>>>,
    stop: Arc<AtomicU64>,
) {
    let mut request = format!("ws://{base}/v1/live")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer demo-key".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket connects");
    let subscribe = json!({"op": "subscribe", "id": "s", "metrics": ["orders"], "windows": ["today"], "interval_ms": interval_ms});
    socket
        .send(Message::Text(subscribe.to_string().into()))
        .await
        .unwrap();
    let mut next_batch = 0usize;
    let mut local = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    while stop.load(Ordering::SeqCst) == 0 {
        let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_millis(500), socket.next()).await
        else {
            continue;
        };
        let Message::Text(text) = message else {
            continue;
        };
        let received = Instant::now();
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(seen) = value["metrics"]["orders"]["windows"]["today"]["value"].as_u64() else {
            continue;
        };
        let acks = acks.lock().unwrap();
        while next_batch < acks.len() && acks[next_batch].0 <= seen {
            let latency_us = received
                .saturating_duration_since(acks[next_batch].1)
                .as_micros() as u64;
            let _ = local.record(latency_us.max(1));
            next_batch += 1;
        }
    }
    latencies.lock().unwrap().add(&local).unwrap();
}

async fn live(
    tally: String,
    config: String,
    clients: usize,
    rate: u64,
    interval_ms: u64,
    seconds: u64,
) {
    let mut node = start_node(&tally, &config, clients).await;
    let pid = node.child.id().unwrap();
    let acks: Acks = Arc::new(Mutex::new(Vec::new()));
    let latencies = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap(),
    ));
    let stop = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(client(
            node.base.clone(),
            interval_ms,
            Arc::clone(&acks),
            Arc::clone(&latencies),
            Arc::clone(&stop),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("{clients} clients connected; posting {rate} events/s for {seconds} s");

    let cpu_start = cpu_seconds(pid);
    let started = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let batches_total = rate * seconds / BATCH;
    let period = Duration::from_micros(1_000_000 * BATCH / rate.max(1));
    let http = reqwest::Client::new();
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut posts = Vec::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(8));
    for batch in 0..batches_total {
        ticks.tick().await;
        let body: String = (0..BATCH)
            .map(|i| format!("{{\"id\":\"b{batch}-{i}\",\"type\":\"order.completed\",\"amount\":{},\"currency\":\"USD\"}}\n", 100 + i))
            .collect();
        let permit = Arc::clone(&in_flight).acquire_owned().await.unwrap();
        let (http, url, acks, acked) = (
            http.clone(),
            format!("http://{}/v1/events", node.base),
            Arc::clone(&acks),
            Arc::clone(&acked),
        );
        posts.push(tokio::spawn(async move {
            let response = http
                .post(url)
                .bearer_auth("demo-key")
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .unwrap();
            let reply: Value = response.json().await.unwrap();
            let accepted = reply["accepted"].as_u64().unwrap_or(0);
            let total = acked.fetch_add(accepted, Ordering::SeqCst) + accepted;
            acks.lock().unwrap().push((total, Instant::now()));
            drop(permit);
        }));
    }
    for post in posts {
        post.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_start;
    let rss = resident_mib(pid);
    tokio::time::sleep(Duration::from_millis(3 * interval_ms + 500)).await;
    stop.store(1, Ordering::SeqCst);
    for task in tasks {
        let _ = task.await;
    }
    let total = acked.load(Ordering::SeqCst);
    let reply: Value = http
        .get(format!(
            "http://{}/v1/metrics/orders?window=today",
            node.base
        ))
        .bearer_auth("demo-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let counted = reply["windows"]["today"]["value"].as_u64().unwrap_or(0);
    let (samples, p50_us, p99_us, max_us) = {
        let latencies = latencies.lock().unwrap();
        (
            latencies.len(),
            latencies.value_at_quantile(0.5),
            latencies.value_at_quantile(0.99),
            latencies.max(),
        )
    };
    println!(
        "clients {clients}, interval_ms {interval_ms}, target {rate} events/s for {seconds} s"
    );
    println!(
        "acknowledged {total} events in {elapsed:.1} s = {:.0} events/s",
        total as f64 / elapsed
    );
    println!(
        "ack -> update latency over {samples} (client, batch) pairs: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p50_us as f64 / 1000.0,
        p99_us as f64 / 1000.0,
        max_us as f64 / 1000.0
    );
    println!(
        "node cpu {:.2} cores over the posting, resident {rss:.0} MiB",
        cpu / elapsed
    );
    let _ = node.child.kill().await;
    assert_eq!(
        counted, total,
        "the node's count must equal what was acknowledged"
    );
    println!("check: node counted {counted} = acknowledged {total}");
}

#[tokio::main]
async fn main() {
    match Cli::parse().scenario {
        Scenario::Live {
            tally,
            config,
            clients,
            rate,
            interval_ms,
            seconds,
        } => live(tally, config, clients, rate, interval_ms, seconds).await,
    }
}
