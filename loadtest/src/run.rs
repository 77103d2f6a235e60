//! Drives one scenario against one target and reports what it measured.
//!
//! Owns: pacing (a fixed rate, or closed loop at the most the target acks),
//! ack latency (from when a batch was due, so a slow target cannot hide its
//! queueing: no coordinated omission), the WebSocket clients, and the
//! target's CPU and resident memory from /proc.
//! Must not decide whether a figure is good: that is for docs/BENCHMARKS.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::redis_target::RedisTarget;
use crate::scenario::{Batch, EventStream, Model, Scenario};
use crate::tally_target::TallyTarget;

pub enum Target {
    Tally(TallyTarget),
    Redis(RedisTarget),
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::Tally(_) => "tally",
            Target::Redis(_) => "redis",
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Target::Tally(target) => target.pid(),
            Target::Redis(target) => target.pid(),
        }
    }

    async fn send(&self, connection: usize, batch: &Batch) -> Result<u32, String> {
        match self {
            Target::Tally(target) => target.send(batch).await,
            Target::Redis(target) => target.send(connection, batch).await,
        }
    }
}

/// What one run measured.
pub struct Report {
    pub target: &'static str,
    pub events_acked: u64,
    pub elapsed_s: f64,
    pub ack_latency_us: Histogram<u64>,
    pub retries: u64,
    pub cpu_cores: f64,
    /// This process (senders, WebSocket clients) over the same run.
    pub generator_cpu_cores: f64,
    pub resident_mib: f64,
    pub ws_latency_us: Option<Histogram<u64>>,
    pub model: Model,
    pub first_s: i64,
    pub last_s: i64,
}

impl Report {
    pub fn events_per_s(&self) -> f64 {
        self.events_acked as f64 / self.elapsed_s
    }

    pub fn print(&self) {
        let ms = |us: u64| us as f64 / 1000.0;
        let h = &self.ack_latency_us;
        println!(
            "[{}] acknowledged {} events in {:.1} s = {:.0} events/s ({} batches, {} retries)",
            self.target,
            self.events_acked,
            self.elapsed_s,
            self.events_per_s(),
            h.len(),
            self.retries
        );
        println!(
            "[{}] ack latency: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            self.target,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max())
        );
        if let Some(ws) = &self.ws_latency_us {
            println!(
                "[{}] ack -> websocket update over {} (client, batch) pairs: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                self.target,
                ws.len(),
                ms(ws.value_at_quantile(0.5)),
                ms(ws.value_at_quantile(0.99)),
                ms(ws.max())
            );
        }
        println!(
            "[{}] server process: {:.2} cores over the run, {:.0} MiB resident at the end; load generator {:.2} cores",
            self.target, self.cpu_cores, self.resident_mib, self.generator_cpu_cores
        );
    }
}

fn latency_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits: the bounds are valid constants
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap()
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name: utime is the 14th, stime the 15th
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Resident memory of another process in bytes, from /proc/<pid>/status (the
/// node reports its own through metrics-process).
pub fn resident_bytes(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })?;
    Some(kib * 1024.0)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Times one WebSocket client may be told `unavailable` and subscribe again.
const RESUBSCRIBES_MAX: u64 = 50;

/// `(orders of tenant 0 acknowledged so far, when)`, in acknowledgement order.
type Acks = Arc<Mutex<Vec<(u64, Instant)>>>;

struct Shared {
    scenario: Scenario,
    target: Target,
    latencies: Mutex<Histogram<u64>>,
    model: Mutex<Model>,
    acked: AtomicU64,
    retries: AtomicU64,
    failed: Mutex<Option<String>>,
    /// Event kinds the WebSocket clients watch (`orders`), and their acks.
    watched_kinds: Vec<usize>,
    ws_acks: Acks,
    ws_orders_acked: Mutex<u64>,
}

impl Shared {
    /// Sends one batch and books it: latency from `due`, the model, the acks
    /// the WebSocket clients compare against.
    async fn deliver(&self, connection: usize, batch: Batch, due: Instant) {
        match self.target.send(connection, &batch).await {
            Ok(retries) => {
                let latency_us = due.elapsed().as_micros() as u64;
                self.retries.fetch_add(retries as u64, Ordering::Relaxed);
                self.acked
                    .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
                // lock order: latencies, then model, then the ws counters
                let _ = self.latencies.lock().unwrap().record(latency_us.max(1));
                if batch.tenant == 0 && !self.watched_kinds.is_empty() {
                    let orders = batch
                        .events
                        .iter()
                        .filter(|event| self.watched_kinds.contains(&event.kind))
                        .count() as u64;
                    let mut acked = self.ws_orders_acked.lock().unwrap();
                    *acked += orders;
                    self.ws_acks.lock().unwrap().push((*acked, Instant::now()));
                }
                self.model.lock().unwrap().add(&batch);
            }
            Err(error) => {
                let mut failed = self.failed.lock().unwrap();
                if failed.is_none() {
                    *failed = Some(error);
                }
            }
        }
    }
}

async fn ws_client(
    base: String,
    interval_ms: u64,
    acks: Acks,
    latencies: Arc<Mutex<Histogram<u64>>>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut request = format!("ws://{base}/v1/live")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", Scenario::tenant_key(0))
            .parse()
            .map_err(|_| "bad header".to_string())?,
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| format!("websocket connect: {e}"))?;
    let subscribe = json!({"op": "subscribe", "id": "s", "metrics": ["orders"], "windows": ["today"], "interval_ms": interval_ms});
    socket
        .send(Message::Text(subscribe.to_string().into()))
        .await
        .map_err(|e| format!("websocket subscribe: {e}"))?;
    let mut next_batch = 0usize;
    let mut local = latency_histogram();
    // (value, when it first arrived): an update can arrive before the load
    // generator has booked the ack it shows, so acks are matched against
    // every update seen so far, not only against the one just received
    let mut updates: Vec<(u64, Instant)> = Vec::new();
    let mut resubscribes = 0u64;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        {
            let acks = acks.lock().unwrap();
            while next_batch < acks.len() {
                let (count, acked_at) = acks[next_batch];
                let first = updates.partition_point(|(value, _)| *value < count);
                let Some((_, received)) = updates.get(first) else {
                    break;
                };
                let latency_us = received.saturating_duration_since(acked_at).as_micros() as u64;
                let _ = local.record(latency_us.max(1));
                next_batch += 1;
            }
        }
        if stopping {
            break;
        }
        let Ok(next) = tokio::time::timeout(Duration::from_millis(500), socket.next()).await else {
            continue;
        };
        // a client the node drops would otherwise just stop recording
        let message = match next {
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("the node closed a websocket: {frame:?}"))
            }
            Some(Ok(message)) => message,
            Some(Err(error)) => return Err(format!("websocket: {error}")),
            None => return Err("the node closed a websocket".into()),
        };
        let Message::Text(text) = message else {
            continue;
        };
        let received = Instant::now();
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if value["type"] == "error" {
            // a busy tenant refuses a subscribe with `unavailable`: subscribe
            // again shortly, as the wall page does; anything else is a failure
            if value["code"] != "unavailable" {
                return Err(format!("the node answered a subscribe with {text}"));
            }
            resubscribes += 1;
            if resubscribes > RESUBSCRIBES_MAX {
                return Err(format!(
                    "subscribe refused {RESUBSCRIBES_MAX} times: {text}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100 + (resubscribes * 37) % 400)).await;
            socket
                .send(Message::Text(subscribe.to_string().into()))
                .await
                .map_err(|e| format!("websocket subscribe: {e}"))?;
            continue;
        }
        let Some(seen) = value["metrics"]["orders"]["windows"]["today"]["value"].as_u64() else {
            continue;
        };
        if updates.last().is_none_or(|(last, _)| seen > *last) {
            updates.push((seen, received));
        }
    }
    let _ = latencies.lock().unwrap().add(&local);
    Ok(())
}

/// Runs the scenario against a started target and returns what it measured.
/// Fails if any batch is not acknowledged.
pub async fn drive(
    target: Target,
    scenario: Scenario,
    watched_kinds: Vec<usize>,
) -> Result<(Report, Target), String> {
    let pid = target.pid().ok_or("the target process is gone")?;
    let ws_base = match &target {
        Target::Tally(tally) if scenario.ws_clients > 0 => Some(tally.base.clone()),
        _ => None,
    };
    let shared = Arc::new(Shared {
        model: Mutex::new(Model::new(&scenario)),
        scenario,
        target,
        latencies: Mutex::new(latency_histogram()),
        acked: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        failed: Mutex::new(None),
        watched_kinds,
        ws_acks: Arc::new(Mutex::new(Vec::new())),
        ws_orders_acked: Mutex::new(0),
    });
    let scenario = &shared.scenario;

    let ws_latencies = Arc::new(Mutex::new(latency_histogram()));
    let ws_stop = Arc::new(AtomicBool::new(false));
    let mut ws_tasks = Vec::new();
    if let Some(base) = &ws_base {
        for _ in 0..scenario.ws_clients {
            ws_tasks.push(tokio::spawn(ws_client(
                base.clone(),
                scenario.ws_interval_ms,
                Arc::clone(&shared.ws_acks),
                Arc::clone(&ws_latencies),
                Arc::clone(&ws_stop),
            )));
        }
        // let every client connect and take its snapshot first
        tokio::time::sleep(Duration::from_secs(2)).await;
        eprintln!("{} websocket clients connected", scenario.ws_clients);
    }

    let first_s = now_ms().div_euclid(1000);
    let cpu_start = cpu_seconds(pid);
    let generator_cpu_start = cpu_seconds(std::process::id());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(scenario.duration_s);
    if scenario.rate_events_per_s == 0 {
        // closed loop at the most the target acks: every connection sends its
        // next batch as soon as the last one is acknowledged
        let mut tasks = Vec::new();
        for connection in 0..scenario.connections {
            let shared = Arc::clone(&shared);
            tasks.push(tokio::spawn(async move {
                let mut stream =
                    EventStream::new(&shared.scenario, shared.scenario.stream_offset + connection);
                while Instant::now() < deadline && shared.failed.lock().unwrap().is_none() {
                    let batch = stream.next_batch(&shared.scenario, now_ms());
                    shared.deliver(connection, batch, Instant::now()).await;
                }
            }));
        }
        for task in tasks {
            task.await.map_err(|e| format!("a sender panicked: {e}"))?;
        }
    } else {
        // a fixed rate: batch k is due at k / batches-per-second, whether or
        // not earlier ones are acknowledged; at most `connections` in flight
        let batches_total =
            scenario.rate_events_per_s * scenario.duration_s / scenario.batch_events as u64;
        let period_ns = 1_000_000_000 * scenario.batch_events as u64 / scenario.rate_events_per_s;
        let mut streams: Vec<EventStream> = (0..scenario.connections)
            .map(|connection| EventStream::new(scenario, scenario.stream_offset + connection))
            .collect();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(scenario.connections));
        let mut tasks = Vec::new();
        for k in 0..batches_total {
            let due = started + Duration::from_nanos(k * period_ns);
            tokio::time::sleep_until(due.into()).await;
            if shared.failed.lock().unwrap().is_some() {
                break;
            }
            let connection = (k % scenario.connections as u64) as usize;
            let batch = streams[connection].next_batch(scenario, now_ms());
            let shared = Arc::clone(&shared);
            let in_flight = Arc::clone(&in_flight);
            tasks.push(tokio::spawn(async move {
                // the semaphore is never closed
                let _permit = in_flight.acquire_owned().await.unwrap();
                shared.deliver(connection, batch, due).await;
            }));
        }
        for task in tasks {
            task.await.map_err(|e| format!("a sender panicked: {e}"))?;
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu_cores = (cpu_seconds(pid) - cpu_start) / elapsed_s;
    let generator_cpu_cores = (cpu_seconds(std::process::id()) - generator_cpu_start) / elapsed_s;
    let last_s = now_ms().div_euclid(1000);
    let resident_mib = resident_bytes(pid).unwrap_or(0.0) / (1024.0 * 1024.0);
    if let Some(error) = shared.failed.lock().unwrap().take() {
        return Err(format!("the run failed: {error}"));
    }

    let ws_latency_us = if ws_base.is_some() {
        tokio::time::sleep(Duration::from_millis(3 * scenario.ws_interval_ms + 500)).await;
        ws_stop.store(true, Ordering::SeqCst);
        for task in ws_tasks {
            task.await
                .map_err(|e| format!("a websocket client panicked: {e}"))??;
        }
        let ws = ws_latencies.lock().unwrap().clone();
        let expected = shared.ws_acks.lock().unwrap().len() as u64 * scenario.ws_clients as u64;
        if ws.len() < expected {
            return Err(format!(
                "{} of {expected} (client, batch) pairs saw no update within {} ms of the run's end",
                expected - ws.len(),
                3 * scenario.ws_interval_ms + 500
            ));
        }
        Some(ws)
    } else {
        None
    };

    let Ok(shared) = Arc::try_unwrap(shared) else {
        return Err("a sender outlived the run".into());
    };
    let report = Report {
        target: shared.target.name(),
        events_acked: shared.acked.load(Ordering::SeqCst),
        elapsed_s,
        ack_latency_us: shared.latencies.into_inner().unwrap(),
        retries: shared.retries.load(Ordering::SeqCst),
        cpu_cores,
        generator_cpu_cores,
        resident_mib,
        ws_latency_us,
        model: shared.model.into_inner().unwrap(),
        first_s,
        last_s,
    };
    Ok((report, shared.target))
}
