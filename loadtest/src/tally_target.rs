//! The Tally target: starts the release node as its own process (loopback,
//! a temporary data directory, the scenario's tenants appended to the config),
//! posts NDJSON batches with retries as a producer would, and checks at the
//! end that the node's windows hold exactly what was acknowledged.
//! Must not reach into the node's memory: everything goes over HTTP.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;
use tally::config::MetricConfig;

use crate::scenario::{expectations, Batch, Model, Scenario, ScenarioEnrichment};

pub struct TallyTarget {
    child: tokio::process::Child,
    /// How the node was started, to start it again on the same data.
    command: (String, std::path::PathBuf, Vec<(String, String)>),
    pub data_dir: std::path::PathBuf,
    pub base: String,
    http: reqwest::Client,
    pub metrics: Vec<MetricConfig>,
    kinds: Vec<String>,
    kind_fields: Vec<(bool, bool)>,
    dim_names: Vec<String>,
    /// The node adds the enrichment's dims: bodies leave them out.
    node_enriches: bool,
    _dir: tempfile::TempDir,
}

/// Loads every tenant's lookup table: a row per value of the key dim, with
/// the values the event stream derives for the added dims.
async fn load_table(
    http: &reqwest::Client,
    base: &str,
    scenario: &Scenario,
    enrichment: &ScenarioEnrichment,
) -> Result<(), String> {
    // check() made sure the key and every added dim have a cardinality
    let keys = scenario
        .cardinality
        .get(&enrichment.key)
        .copied()
        .unwrap_or(0);
    let mut rows = String::new();
    for k in 0..keys {
        let _ = write!(rows, "{{\"key\":\"{}-{k}\"", enrichment.key);
        for add in &enrichment.adds {
            let cardinality = scenario.cardinality.get(add).copied().unwrap_or(1);
            let _ = write!(rows, ",\"{add}\":\"{add}-{}\"", k % cardinality);
        }
        rows.push_str("}\n");
    }
    for tenant in 0..scenario.tenants {
        let response = http
            .put(format!("http://{base}/v1/lookups/{}", enrichment.table))
            .bearer_auth(Scenario::tenant_key(tenant))
            .header("content-type", "application/x-ndjson")
            .body(rows.clone())
            .send()
            .await
            .map_err(|e| format!("loading the lookup table: {e}"))?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(format!("loading the lookup table: {status} {text}"));
        }
    }
    Ok(())
}

/// Attempts at one batch before the run fails (429/503 wait `Retry-After`).
const ATTEMPTS_MAX: u32 = 100;

impl TallyTarget {
    pub async fn start(
        tally: &str,
        config: &str,
        scenario: &Scenario,
    ) -> Result<TallyTarget, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut text =
            std::fs::read_to_string(config).map_err(|e| format!("cannot read {config}: {e}"))?;
        for tenant in 0..scenario.tenants {
            write!(
                text,
                "\n[[tenants]]\nid = \"{}\"\napi_keys = [\"{}\"]\ncurrency = \"USD\"\ntimezone = \"UTC\"\n",
                Scenario::tenant_id(tenant),
                Scenario::tenant_key(tenant)
            )
            .map_err(|e| e.to_string())?;
        }
        let node_enrichment = scenario
            .enrichment
            .as_ref()
            .filter(|enrichment| !enrichment.by_producer);
        if let Some(enrichment) = node_enrichment {
            write!(
                text,
                "\n[[enrichments]]\ntable = \"{}\"\nkey = \"{}\"\nadds = {:?}\n",
                enrichment.table, enrichment.key, enrichment.adds
            )
            .map_err(|e| e.to_string())?;
        }
        let config_path = dir.path().join("tally.toml");
        std::fs::write(&config_path, &text)
            .map_err(|e| format!("cannot write the node config: {e}"))?;
        let parsed = tally::config::Config::parse(&text, Vec::new())
            .map_err(|issues| format!("the node config is invalid: {issues:?}"))?;
        let port = free_port()?;
        let data_dir = dir.path().join("data");
        let mut env = vec![
            (
                "TALLY_SERVER__LISTEN".to_string(),
                format!("127.0.0.1:{port}"),
            ),
            (
                "TALLY_STORAGE__DATA_DIR".to_string(),
                data_dir.display().to_string(),
            ),
            // room for every id of the run; the table grows only as ids arrive
            (
                "TALLY_INGEST__DEDUP_TABLE_BYTES_MAX".to_string(),
                // 200 M ids at 128 bytes
                "25600000000".to_string(),
            ),
            (
                "TALLY_LIVE__SESSIONS_PER_TENANT_MAX".to_string(),
                (scenario.ws_clients + 10).to_string(),
            ),
            // warnings, and the start's lines (what recovery took, by phase)
            ("RUST_LOG".to_string(), "warn,tally::app=info".to_string()),
        ];
        for (key, value) in &scenario.node_env {
            env.push((key.clone(), value.clone()));
        }
        let command = (tally.to_string(), config_path.clone(), env);
        let mut child = spawn_node(&command)?;
        let base = format!("127.0.0.1:{port}");
        // a node that hangs fails the run instead of hanging it
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let mut ready = false;
        for _ in 0..600 {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the node exited before it was ready ({status}); its stderr says why"
                ));
            }
            if let Ok(response) = http.get(format!("http://{base}/readyz")).send().await {
                if response.status().is_success() {
                    ready = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !ready {
            return Err("the node did not become ready in 30 s".into());
        }
        if let Some(enrichment) = node_enrichment {
            load_table(&http, &base, scenario, enrichment).await?;
        }
        let kind_fields = scenario
            .mix
            .iter()
            .map(|kind| (kind.amount.is_some(), kind.value.is_some()))
            .collect();
        Ok(TallyTarget {
            child,
            command,
            data_dir,
            base,
            http,
            metrics: parsed.metrics.clone(),
            kinds: scenario
                .mix
                .iter()
                .map(|kind| kind.event_type.clone())
                .collect(),
            kind_fields,
            dim_names: scenario.dim_names(),
            node_enriches: node_enrichment.is_some(),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until the node answers ready; the seconds it took.
    async fn wait_ready(&mut self) -> Result<f64, String> {
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the node exited before it was ready ({status})"));
            }
            if let Ok(response) = self
                .http
                .get(format!("http://{}/readyz", self.base))
                .send()
                .await
            {
                if response.status().is_success() {
                    return Ok(started.elapsed().as_secs_f64());
                }
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err("the node was not ready within 120 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, then the node again on the same data: the seconds from the
    /// new process's start to ready.
    pub async fn kill_and_restart(&mut self) -> Result<f64, String> {
        self.child.kill().await.map_err(|e| e.to_string())?;
        self.child = spawn_node(&self.command)?;
        self.wait_ready().await
    }

    /// SIGTERM (a graceful stop with its final snapshot): the seconds to exit.
    pub async fn stop_gracefully(&mut self) -> Result<f64, String> {
        let pid = self.child.id().ok_or("the node is gone")?;
        let started = std::time::Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("kill -TERM failed".into());
        }
        let exited = tokio::time::timeout(Duration::from_secs(120), self.child.wait())
            .await
            .map_err(|_| "the node did not stop within 120 s".to_string())?
            .map_err(|e| e.to_string())?;
        if !exited.success() {
            return Err(format!("the node stopped with {exited}"));
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Posts one batch once; its outcome counts (`accepted`, `duplicates`).
    pub async fn post_once(&self, batch: &Batch) -> Result<(u64, u64), String> {
        let response = self
            .http
            .post(format!("http://{}/v1/events", self.base))
            .bearer_auth(Scenario::tenant_key(batch.tenant))
            .header("content-type", "application/x-ndjson")
            .body(self.render(batch))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        Ok((
            body["accepted"].as_u64().unwrap_or(0),
            body["duplicates"].as_u64().unwrap_or(0),
        ))
    }

    pub fn render(&self, batch: &Batch) -> String {
        let mut body = String::with_capacity(batch.events.len() * 160);
        for event in &batch.events {
            let (has_amount, has_value) = self.kind_fields[event.kind];
            // writing to a String cannot fail
            let _ = write!(
                body,
                "{{\"id\":\"{}-{}\",\"type\":\"{}\",\"ts\":{}",
                batch.stream, event.serial, self.kinds[event.kind], event.ts_ms
            );
            if has_amount {
                let _ = write!(
                    body,
                    ",\"amount\":{},\"currency\":\"USD\"",
                    event.amount.unwrap_or(0)
                );
            }
            if has_value {
                let _ = write!(body, ",\"value\":{}", event.value.unwrap_or(0));
            }
            let sent = if self.node_enriches {
                &event.dims[..event.dims.len() - event.added]
            } else {
                &event.dims[..]
            };
            if !sent.is_empty() {
                body.push_str(",\"dims\":{");
                for (n, (dim, value)) in sent.iter().enumerate() {
                    let name = &self.dim_names[*dim];
                    let comma = if n == 0 { "" } else { "," };
                    let _ = write!(body, "{comma}\"{name}\":\"{name}-{value}\"");
                }
                body.push('}');
            }
            body.push_str("}\n");
        }
        body
    }

    /// Posts one batch until it is acknowledged; returns the retries it took.
    /// Every event must come back accepted or duplicate (a retry of a batch
    /// whose reply was lost); anything else fails the run.
    pub async fn send(&self, batch: &Batch) -> Result<u32, String> {
        let body = self.render(batch);
        let url = format!("http://{}/v1/events", self.base);
        let key = Scenario::tenant_key(batch.tenant);
        let mut retries = 0;
        loop {
            if retries >= ATTEMPTS_MAX {
                return Err(format!(
                    "a batch was not acknowledged after {ATTEMPTS_MAX} attempts"
                ));
            }
            let response = self
                .http
                .post(&url)
                .bearer_auth(&key)
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await;
            let response = match response {
                Ok(response) => response,
                Err(error) => {
                    retries += 1;
                    eprintln!("post failed ({error}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let status = response.status().as_u16();
            if status == 429 || status == 503 {
                let wait_s = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                retries += 1;
                // a producer backs off; 1 s of Retry-After is long for a load
                // test, so wait a tenth of it
                tokio::time::sleep(Duration::from_millis(wait_s * 100)).await;
                continue;
            }
            let reply: Value = response
                .json()
                .await
                .map_err(|e| format!("status {status}: unreadable reply: {e}"))?;
            if status != 200 {
                return Err(format!("status {status}: {reply}"));
            }
            let duplicates = reply["duplicates"].as_u64().unwrap_or(0);
            // ids are unique in a run: only a resent batch may meet its own ids
            if retries == 0 && duplicates > 0 {
                return Err(format!(
                    "a first attempt came back with {duplicates} duplicates: {reply}"
                ));
            }
            let acked = reply["accepted"].as_u64().unwrap_or(0) + duplicates;
            if acked != batch.events.len() as u64 {
                return Err(format!(
                    "only {acked} of {} events acknowledged: {reply}",
                    batch.events.len()
                ));
            }
            return Ok(retries);
        }
    }

    async fn get(&self, tenant: usize, path_and_query: &str) -> Result<Value, String> {
        let response = self
            .http
            .get(format!("http://{}{path_and_query}", self.base))
            .bearer_auth(Scenario::tenant_key(tenant))
            .send()
            .await
            .map_err(|e| format!("GET {path_and_query}: {e}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("GET {path_and_query}: {e}"))?;
        if !status.is_success() {
            return Err(format!("GET {path_and_query}: {status} {body}"));
        }
        Ok(body)
    }

    /// Compares every metric of every tenant, in `windows`, and every
    /// breakdown by each declared dim, with the model. Returns the number of
    /// figures compared, or every difference.
    pub async fn check(
        &self,
        scenario: &Scenario,
        model: &Model,
        windows: &[&str],
    ) -> Result<usize, Vec<String>> {
        let mut differences = Vec::new();
        let mut compared = 0;
        let plan = expectations(&self.metrics, scenario);
        for tenant in 0..scenario.tenants {
            let all = match self.get(tenant, "/v1/metrics").await {
                Ok(all) => all,
                Err(error) => {
                    differences.push(error);
                    continue;
                }
            };
            for window in windows {
                for (metric, expectation) in &plan {
                    let figures = expectation.figures(|kind| model.by_type[tenant][kind]);
                    let got = &all["metrics"][&metric.name]["windows"][*window];
                    for (field, want) in figures {
                        compared += 1;
                        let label = || format!("tenant {tenant} {} {window} {field}", metric.name);
                        compare_figure(got, field, want, label, &mut differences);
                    }
                }
            }
            // breakdowns: each declared dim on its own, `__none__` for events
            // without it; values past the series cap are folded into
            // `__other__`, so what the node does not list must add up there
            let window = windows[0];
            for (metric, expectation) in &plan {
                for dim in &metric.dims {
                    let reply = match self
                        .get(
                            tenant,
                            &format!("/v1/metrics/{}?window={window}&by={dim}", metric.name),
                        )
                        .await
                    {
                        Ok(reply) => reply,
                        Err(error) => {
                            differences.push(error);
                            continue;
                        }
                    };
                    let values = &reply["values"];
                    let expected: std::collections::BTreeMap<String, Vec<(&str, i128)>> = model
                        .breakdown(scenario, tenant, dim, expectation)
                        .into_iter()
                        .collect();
                    let mut folded: Vec<(&str, i128)> = Vec::new();
                    for (name, figures) in &expected {
                        let got = &values[name.as_str()]["windows"][window];
                        if got.is_null() {
                            for (field, value) in figures {
                                match folded.iter_mut().find(|(f, _)| f == field) {
                                    Some(entry) => entry.1 += value,
                                    None => folded.push((field, *value)),
                                }
                            }
                            continue;
                        }
                        for (field, want) in figures {
                            compared += 1;
                            let label = || {
                                format!(
                                    "tenant {tenant} {} by {dim}={name} {window} {field}",
                                    metric.name
                                )
                            };
                            compare_figure(got, field, *want, label, &mut differences);
                        }
                    }
                    // nothing may show up that was not sent
                    for (name, listed) in values.as_object().into_iter().flatten() {
                        let sent = expected.contains_key(name)
                            || (name == "__other__" && !folded.is_empty());
                        let counted = listed["windows"][window]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .any(|(_, v)| v.as_f64().is_some_and(|v| v != 0.0));
                        if !sent && counted {
                            differences.push(format!(
                                "tenant {tenant} {} by {dim}={name} {window}: the node counts a value that was never sent",
                                metric.name
                            ));
                        }
                    }
                    let other = &values["__other__"]["windows"][window];
                    for (field, want) in folded {
                        compared += 1;
                        let label = || {
                            format!(
                                "tenant {tenant} {} by {dim}=__other__ {window} {field}",
                                metric.name
                            )
                        };
                        compare_figure(other, field, want, label, &mut differences);
                    }
                }
            }
        }
        if differences.is_empty() {
            Ok(compared)
        } else {
            Err(differences)
        }
    }

    /// When a check fails: the seconds where the node's `orders` series of
    /// tenant 0 differs from what was sent, as `(second, node, sent)`.
    pub async fn orders_by_second(
        &self,
        model: &Model,
        order_kinds: &[usize],
    ) -> Result<Vec<(i64, i64, i64)>, String> {
        let reply = self
            .get(0, "/v1/metrics/orders/series?window=15m&step=1s")
            .await?;
        let mut node: std::collections::BTreeMap<i64, i64> = Default::default();
        for point in reply["points"].as_array().into_iter().flatten() {
            let second = point[0].as_i64().unwrap_or(0).div_euclid(1000);
            *node.entry(second).or_default() += point[1].as_i64().unwrap_or(0);
        }
        let mut sent: std::collections::BTreeMap<i64, i64> = Default::default();
        for ((second, kind), count) in &model.by_second[0] {
            if order_kinds.contains(kind) {
                *sent.entry(*second).or_default() += *count as i64;
            }
        }
        let mut seconds: Vec<i64> = node.keys().chain(sent.keys()).copied().collect();
        seconds.sort_unstable();
        seconds.dedup();
        Ok(seconds
            .into_iter()
            .map(|s| {
                (
                    s,
                    node.get(&s).copied().unwrap_or(0),
                    sent.get(&s).copied().unwrap_or(0),
                )
            })
            .filter(|(_, node, sent)| node != sent)
            .collect())
    }

    /// The text of `/metrics`, with `key` when given (tenant samples need one).
    async fn scrape(&self, key: Option<&str>) -> Result<String, String> {
        let mut request = self.http.get(format!("http://{}/metrics", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request
            .send()
            .await
            .map_err(|e| format!("GET /metrics: {e}"))?
            .text()
            .await
            .map_err(|e| format!("GET /metrics: {e}"))
    }

    /// The node's own telemetry: resident bytes, events accepted, and the
    /// counts of every other outcome.
    pub async fn telemetry(&self) -> Result<(f64, f64, Vec<String>), String> {
        let text = self.scrape(None).await?;
        let mut resident = 0.0;
        let mut accepted = 0.0;
        let mut others = Vec::new();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            if name == tally::telemetry::PROCESS_RESIDENT_MEMORY_BYTES {
                resident = value;
            } else if name.starts_with(tally::telemetry::EVENTS_TOTAL) {
                if name.contains("outcome=\"accepted\"") {
                    accepted += value;
                } else {
                    others.push(format!("{name} {value}"));
                }
            }
        }
        Ok((resident, accepted, others))
    }

    /// The node's storage work so far, from its own telemetry (no key: node
    /// series are open): snapshots and log flushes, each a count and the
    /// seconds they took in all, and the size of the last snapshot.
    pub async fn storage_work(&self) -> Result<StorageWork, String> {
        let text = self.scrape(None).await?;
        let snapshot = tally::telemetry::SNAPSHOT_SECONDS;
        let flush = tally::telemetry::WAL_FLUSH_SECONDS;
        let (snapshot_count, snapshot_sum) =
            (format!("{snapshot}_count"), format!("{snapshot}_sum"));
        let (flush_count, flush_sum) = (format!("{flush}_count"), format!("{flush}_sum"));
        let mut work = StorageWork::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            // the series name without its labels
            let name = name.split('{').next().unwrap_or(name);
            if name == snapshot_count {
                work.snapshots += value;
            } else if name == snapshot_sum {
                work.snapshot_s += value;
            } else if name == flush_count {
                work.flushes += value;
            } else if name == flush_sum {
                work.flush_s += value;
            } else if name == tally::telemetry::SNAPSHOT_BYTES {
                work.snapshot_bytes = value;
            }
        }
        Ok(work)
    }

    /// The first tenant's freshness histograms from `/metrics` (scraped with
    /// its key: tenant samples need one): per histogram, its count, mean and
    /// the bucket bounds its p50 and p99 fall in.
    pub async fn freshness(&self) -> Result<Vec<String>, String> {
        let tenant = Scenario::tenant_id(0);
        let text = self.scrape(Some(&Scenario::tenant_key(0))).await?;
        let mut lines = Vec::new();
        for (name, what) in [
            (
                tally::telemetry::EVENT_FRESHNESS_SECONDS,
                "event time → acknowledged",
            ),
            (
                tally::telemetry::LIVE_VISIBLE_SECONDS,
                "acknowledged → on the live feed",
            ),
        ] {
            let labels = format!("{{tenant=\"{tenant}\"");
            let value = |suffix: &str| -> f64 {
                text.lines()
                    .find_map(|line| line.strip_prefix(&format!("{name}_{suffix}{labels}}} ")))
                    .and_then(|value| value.parse().ok())
                    .unwrap_or(0.0)
            };
            let (count, sum) = (value("count"), value("sum"));
            if count == 0.0 {
                lines.push(format!("{what}: no samples"));
                continue;
            }
            // cumulative buckets, in order: the first bound holding a quantile
            let mut buckets: Vec<(f64, f64)> = text
                .lines()
                .filter_map(|line| {
                    let rest = line.strip_prefix(&format!("{name}_bucket{labels},le=\""))?;
                    let (bound, value) = rest.split_once("\"} ")?;
                    Some((bound.parse().unwrap_or(f64::INFINITY), value.parse().ok()?))
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let within = |quantile: f64| {
                buckets
                    .iter()
                    .find(|(_, cumulative)| *cumulative >= quantile * count)
                    .map_or(f64::INFINITY, |(bound, _)| *bound)
            };
            lines.push(format!(
                "{what}: {count:.0} samples, mean {:.1} ms, p50 ≤ {} s, p99 ≤ {} s",
                sum / count * 1000.0,
                within(0.5),
                within(0.99)
            ));
        }
        Ok(lines)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Compares one figure of the node's window JSON with what was sent.
fn compare_figure(
    got: &Value,
    field: &str,
    want: i128,
    label: impl FnOnce() -> String,
    differences: &mut Vec<String>,
) {
    let have = got[field].as_i64().map(i128::from);
    if have != Some(want) {
        differences.push(format!("{}: node {have:?}, sent {want}", label()));
    }
}

fn spawn_node(
    (tally, config_path, env): &(String, std::path::PathBuf, Vec<(String, String)>),
) -> Result<tokio::process::Child, String> {
    let mut command = tokio::process::Command::new(tally);
    command
        .args(["serve", "--config"])
        .arg(config_path)
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .spawn()
        .map_err(|e| format!("cannot start {tally} (cargo build --release first): {e}"))
}

pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Counters of the node's storage work (`TallyTarget::storage_work`); the
/// difference of two readings is the work between them.
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageWork {
    pub snapshots: f64,
    pub snapshot_s: f64,
    pub snapshot_bytes: f64,
    pub flushes: f64,
    pub flush_s: f64,
}

impl StorageWork {
    /// `(snapshots, mean ms a snapshot, mean ms a log flush)` since `earlier`.
    pub fn since(&self, earlier: &StorageWork) -> (f64, f64, f64) {
        let snapshots = self.snapshots - earlier.snapshots;
        let flushes = self.flushes - earlier.flushes;
        let mean_ms = |seconds: f64, count: f64| {
            if count > 0.0 {
                seconds * 1000.0 / count
            } else {
                0.0
            }
        };
        (
            snapshots,
            mean_ms(self.snapshot_s - earlier.snapshot_s, snapshots),
            mean_ms(self.flush_s - earlier.flush_s, flushes),
        )
    }
}
