//! The Redis 7 peer: starts `redis-server` on loopback with the AOF on and
//! `appendfsync always` (a reply only after the write is fsynced, as Tally's
//! acknowledgement), and does per event what users build live counters on
//! Redis with:
//! - `SET dedup:{tenant}:{id} 1 NX EX 90000` (one pipeline per batch): an
//!   event whose id was seen within 25 h is a duplicate;
//! - for each new event and each catalogue metric it feeds, `INCRBY` on the
//!   per-second bucket keys of the metric's total series and of each declared
//!   dim's series (`sum` and `count`, a ratio's `num` and `den`; a histogram is
//!   an `HINCRBY` of a value bucket), then one `EXPIRE` per key the batch
//!   touched (second pipeline). Windows are sums of buckets when read.
//!
//! Must not do less per event than Tally does: same events, same series, same
//! de-dup, a reply only after the fsync.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tally::config::MetricConfig;

use crate::scenario::{expectations, Batch, Expectation, Model, Scenario};

/// De-dup ids live this long, in seconds (Tally's horizon is 24 h).
const DEDUP_TTL_S: u64 = 90_000;
/// Bucket keys live this long, in seconds (today's window and yesterday's).
const BUCKET_TTL_S: u64 = 2 * 86_400;

enum Op {
    Sum { of_value: bool },
    Count,
    Ratio { numerator: bool, denominator: bool },
    Histogram,
}

struct Feed {
    metric: String,
    op: Op,
    /// Dims of the metric: index into the scenario's dims, or `None` when
    /// the scenario never sends it (every event goes to `__none__`).
    dims: Vec<(String, Option<usize>)>,
}

pub struct RedisTarget {
    child: tokio::process::Child,
    connections: Vec<MultiplexedConnection>,
    /// Per event kind, the metrics it feeds.
    feeds: Vec<Vec<Feed>>,
    dim_names: Vec<String>,
    _dir: tempfile::TempDir,
}

impl RedisTarget {
    pub async fn start(
        redis_server: &str,
        scenario: &Scenario,
        metrics: &[MetricConfig],
    ) -> Result<RedisTarget, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let port = crate::tally_target::free_port()?;
        let child = tokio::process::Command::new(redis_server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
            ])
            .arg(dir.path().join("redis.log"))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!("cannot start {redis_server} (loadtest/compare installs it): {e}")
            })?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .map_err(|e| format!("redis client: {e}"))?;
        let mut connections = Vec::new();
        for _ in 0..300 {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                let pong: Result<String, _> = redis::cmd("PING").query_async(&mut connection).await;
                if pong.is_ok() {
                    connections.push(connection);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if connections.is_empty() {
            return Err("redis-server did not answer PING in 15 s".into());
        }
        // one TCP connection per scenario connection, as a producer pool has
        while connections.len() < scenario.connections {
            connections.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("redis connection: {e}"))?,
            );
        }
        let dim_names = scenario.dim_names();
        let mut feeds: Vec<Vec<Feed>> = scenario.mix.iter().map(|_| Vec::new()).collect();
        for (metric, expectation) in expectations(metrics, scenario) {
            let dims: Vec<(String, Option<usize>)> = metric
                .dims
                .iter()
                .map(|dim| (dim.clone(), dim_names.iter().position(|name| name == dim)))
                .collect();
            for kind in expectation.kinds() {
                let op = match &expectation {
                    Expectation::Sum { of_value, .. } => Op::Sum {
                        of_value: *of_value,
                    },
                    Expectation::Count { .. } => Op::Count,
                    Expectation::Histogram { .. } => Op::Histogram,
                    Expectation::Ratio {
                        numerator,
                        denominator,
                    } => Op::Ratio {
                        numerator: numerator.contains(&kind),
                        denominator: denominator.contains(&kind),
                    },
                };
                feeds[kind].push(Feed {
                    metric: metric.name.clone(),
                    op,
                    dims: dims.clone(),
                });
            }
        }
        Ok(RedisTarget {
            child,
            connections,
            feeds,
            dim_names,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// De-dups and counts one batch on connection `connection`; returns the
    /// retries it took (none: a Redis error fails the run).
    pub async fn send(&self, connection: usize, batch: &Batch) -> Result<u32, String> {
        let mut con = self.connections[connection % self.connections.len()].clone();
        let tenant = Scenario::tenant_id(batch.tenant);
        let mut dedup = redis::pipe();
        for event in &batch.events {
            dedup
                .cmd("SET")
                .arg(format!("dedup:{tenant}:{}-{}", batch.stream, event.serial))
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(DEDUP_TTL_S);
        }
        let fresh: Vec<Option<String>> = dedup
            .query_async(&mut con)
            .await
            .map_err(|e| format!("redis de-dup pipeline: {e}"))?;
        let mut counters = redis::pipe();
        let mut touched: HashSet<String> = HashSet::new();
        let mut key = String::with_capacity(96);
        for (event, fresh) in batch.events.iter().zip(fresh) {
            if fresh.is_none() {
                continue;
            }
            let second = event.ts_ms.div_euclid(1000);
            for feed in &self.feeds[event.kind] {
                let mut series: Vec<String> = vec!["_".to_string()];
                for (dim, index) in &feed.dims {
                    let value =
                        index.and_then(|index| event.dims.iter().find(|(d, _)| *d == index));
                    series.push(match value {
                        Some((d, v)) => format!("{dim}={}-{v}", self.dim_names[*d]),
                        None => format!("{dim}=__none__"),
                    });
                }
                for series in &series {
                    let mut bump = |field: &str, by: i64, counters: &mut redis::Pipeline| {
                        key.clear();
                        let _ = write!(key, "m:{tenant}:{}:{series}:{second}:{field}", feed.metric);
                        counters.cmd("INCRBY").arg(&key).arg(by).ignore();
                        if !touched.contains(&key) {
                            touched.insert(key.clone());
                        }
                    };
                    match feed.op {
                        Op::Sum { of_value } => {
                            let by = if of_value { event.value } else { event.amount };
                            bump("sum", by.unwrap_or(0), &mut counters);
                            bump("count", 1, &mut counters);
                        }
                        Op::Count => bump("count", 1, &mut counters),
                        Op::Ratio {
                            numerator,
                            denominator,
                        } => {
                            if numerator {
                                bump("num", 1, &mut counters);
                            }
                            if denominator {
                                bump("den", 1, &mut counters);
                            }
                        }
                        Op::Histogram => {
                            key.clear();
                            let _ =
                                write!(key, "m:{tenant}:{}:{series}:{second}:hist", feed.metric);
                            counters
                                .cmd("HINCRBY")
                                .arg(&key)
                                .arg(value_bucket(event.value.unwrap_or(0)))
                                .arg(1)
                                .ignore();
                            if !touched.contains(&key) {
                                touched.insert(key.clone());
                            }
                        }
                    }
                }
            }
        }
        for key in &touched {
            counters.cmd("EXPIRE").arg(key).arg(BUCKET_TTL_S).ignore();
        }
        counters
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| format!("redis counter pipeline: {e}"))?;
        Ok(0)
    }

    /// Sums every tenant's bucket keys over `[first_s, last_s]`, of each
    /// metric's total series and of every dim series, and compares them with
    /// the model.
    pub async fn check(
        &self,
        scenario: &Scenario,
        model: &Model,
        metrics: &[MetricConfig],
        first_s: i64,
        last_s: i64,
    ) -> Result<usize, Vec<String>> {
        let mut con = self.connections[0].clone();
        let mut differences = Vec::new();
        let mut compared = 0;
        for tenant in 0..scenario.tenants {
            let tenant_id = Scenario::tenant_id(tenant);
            for (metric, expectation) in expectations(metrics, scenario) {
                // the total series, then each declared dim's series with the
                // figures the model expects of it
                let mut series: Vec<(String, Vec<(&'static str, i128)>)> = vec![(
                    "_".into(),
                    expectation.figures(|kind| model.by_type[tenant][kind]),
                )];
                for dim in &metric.dims {
                    for (label, figures) in model.breakdown(scenario, tenant, dim, &expectation) {
                        series.push((format!("{dim}={label}"), figures));
                    }
                }
                for (name, figures) in series {
                    for (field, want) in figures {
                        let redis_field = match (&expectation, field) {
                            (Expectation::Sum { .. }, "value") => "sum",
                            (Expectation::Ratio { .. }, "numerator") => "num",
                            (Expectation::Ratio { .. }, "denominator") => "den",
                            (Expectation::Histogram { .. }, _) => "hist",
                            _ => "count",
                        };
                        let mut reads = redis::pipe();
                        for second in first_s..=last_s {
                            let key = format!(
                                "m:{tenant_id}:{}:{name}:{second}:{redis_field}",
                                metric.name
                            );
                            if redis_field == "hist" {
                                reads.cmd("HVALS").arg(key);
                            } else {
                                reads.cmd("GET").arg(key);
                            }
                        }
                        let have: i128 = if redis_field == "hist" {
                            let counts: Vec<Vec<i64>> = reads
                                .query_async(&mut con)
                                .await
                                .map_err(|e| vec![format!("redis HVALS: {e}")])?;
                            counts.iter().flatten().map(|c| *c as i128).sum()
                        } else {
                            let values: Vec<Option<i64>> = reads
                                .query_async(&mut con)
                                .await
                                .map_err(|e| vec![format!("redis GET: {e}")])?;
                            values.iter().map(|v| v.unwrap_or(0) as i128).sum()
                        };
                        compared += 1;
                        if have != want {
                            differences.push(format!(
                                "redis tenant {tenant} {} {name} {field}: counted {have}, sent {want}",
                                metric.name
                            ));
                        }
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

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A histogram bucket as users key one in a hash: the value with two
/// significant digits (3 456 → 3 400), a relative error under 10 %.
fn value_bucket(value: i64) -> i64 {
    let mut scale = 1;
    let mut v = value.max(0);
    while v >= 100 {
        v /= 10;
        scale *= 10;
    }
    v * scale
}

#[cfg(test)]
mod tests {
    #[test]
    fn value_buckets_keep_two_significant_digits() {
        assert_eq!(super::value_bucket(7), 7);
        assert_eq!(super::value_bucket(99), 99);
        assert_eq!(super::value_bucket(3456), 3400);
        assert_eq!(super::value_bucket(-5), 0);
    }
}
