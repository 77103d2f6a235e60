//! Node telemetry: every metric name and its help text in one place, recorded
//! through the `metrics` facade and rendered by metrics-exporter-prometheus
//! (`install`). Label values are bounded: outcomes, reasons and actor kinds are
//! closed sets; tenant ids and metric names come from config.
//! Must not: create labels from request input.

use std::sync::OnceLock;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::event::Reason;

pub const EVENTS_TOTAL: &str = "tally_events_total";
pub const EVENTS_QUARANTINED_BY_REASON_TOTAL: &str = "tally_events_quarantined_by_reason_total";
pub const EVENTS_REJECTED_BY_REASON_TOTAL: &str = "tally_events_rejected_by_reason_total";
pub const REQUESTS_SHED_TOTAL: &str = "tally_requests_shed_total";
pub const INGEST_REQUEST_SECONDS: &str = "tally_ingest_request_duration_seconds";
pub const INGEST_REQUEST_EVENTS: &str = "tally_ingest_request_events";
pub const WAL_FLUSH_SECONDS: &str = "tally_wal_flush_duration_seconds";
pub const WAL_WRITE_SETS_PER_FLUSH: &str = "tally_wal_write_sets_per_flush";
pub const SNAPSHOT_SECONDS: &str = "tally_snapshot_duration_seconds";
pub const SNAPSHOT_BYTES: &str = "tally_snapshot_size_bytes";
pub const RECOVERY_SECONDS: &str = "tally_recovery_duration_seconds";
pub const ACTOR_MESSAGES_TOTAL: &str = "tally_actor_messages_total";
pub const QUARANTINE_EVENTS: &str = "tally_quarantine_events";
pub const DEDUP_RUNS: &str = "tally_dedup_runs";
pub const ALERT_FIRING: &str = "tally_alert_firing";
pub const EVENT_FRESHNESS_SECONDS: &str = "tally_event_freshness_seconds";
pub const LIVE_VISIBLE_SECONDS: &str = "tally_live_visible_seconds";
pub const AUDIT_LARGE_READS_TOTAL: &str = "tally_audit_large_reads_total";
pub const AUTH_FAILURES_TOTAL: &str = "tally_auth_failures_total";
pub const AUTH_FAILURE_BURSTS_TOTAL: &str = "tally_auth_failure_bursts_total";
pub const AUDIT_DROPPED_TOTAL: &str = "tally_audit_dropped_total";
pub const EXPERIMENT_SIGNALS_TOTAL: &str = "tally_experiment_signals_total";
pub const EXPERIMENT_UNATTRIBUTED_TOTAL: &str = "tally_experiment_unattributed_events_total";
pub const DEDUP_FILTER_BYTES: &str = "tally_dedup_filter_bytes";
pub const DEDUP_RUNS_UNCOVERED: &str = "tally_dedup_runs_uncovered";
pub const DEDUP_MERGES_TOTAL: &str = "tally_dedup_merges_total";
pub const QUARANTINE_EVICTED_TOTAL: &str = "tally_quarantine_evicted_total";
pub const SERIES_FOLDED_TOTAL: &str = "tally_series_folded_total";
pub const METRIC_APPLY_ERRORS_TOTAL: &str = "tally_metric_apply_errors_total";
/// From metrics-process, with the other standard `process_*` metrics.
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";
pub const TENANT_SERIES_DROPPED_TOTAL: &str = "tally_tenant_series_dropped_total";
pub const LIVE_SESSIONS: &str = "tally_live_sessions";
/// Lookups of `[[enrichments]]` in acknowledged batches, by `outcome`: `hit`,
/// `unknown` (a miss that added `__unknown__`), `quarantined` (a miss that
/// held the event): the enrichment success rate.
pub const ENRICHMENT_LOOKUPS_TOTAL: &str = "tally_enrichment_lookups_total";
/// Tenants serving now (config and API; `admin.tenants_max` bounds it).
pub const TENANTS: &str = "tally_tenants";
pub const LIVE_SUBSCRIPTIONS: &str = "tally_live_subscriptions";
pub const LIVE_UPDATES_SENT_TOTAL: &str = "tally_live_updates_sent_total";
pub const LIVE_UPDATES_CONFLATED_TOTAL: &str = "tally_live_updates_conflated_total";

/// Latency buckets in seconds (100 µs to 10 s).
const SECONDS_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
];
/// Freshness buckets: event time → acknowledged, acknowledged → on the feed.
const FRESHNESS_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];
/// Size buckets (events per request, write sets per flush).
const COUNT_BUCKETS: [f64; 10] = [
    1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 10_000.0, 100_000.0,
];

/// Outcome of one event (API.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Late,
    Quarantined,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Late => "late",
            Outcome::Quarantined => "quarantined",
            Outcome::Rejected => "rejected",
        }
    }
}

/// Why a request was refused to shed load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The tenant's ingest batches in flight (429).
    BatchesInFlight,
    /// The tenant's reads in flight (503).
    ReadsInFlight,
    /// The node's request bytes in flight (503).
    RequestBytes,
    /// The tenant's de-dup table (503).
    DedupFull,
    /// Storage failed or the actors stopped (503).
    Unavailable,
    /// The data directory is below `storage.disk_free_bytes_min` (507).
    DiskShort,
    /// The node has `server.connections_max` connections open (503).
    Connections,
    /// The node has `live.sessions_max` live sessions (503).
    LiveSessions,
    /// The tenant's `ingest.tenant_events_per_second_max` (429).
    RateLimited,
}

impl Shed {
    fn as_str(self) -> &'static str {
        match self {
            Shed::BatchesInFlight => "batches_in_flight",
            Shed::ReadsInFlight => "reads_in_flight",
            Shed::RequestBytes => "request_bytes",
            Shed::Connections => "connections",
            Shed::LiveSessions => "live_sessions",
            Shed::RateLimited => "rate_limited",
            Shed::DedupFull => "dedup_full",
            Shed::Unavailable => "unavailable",
            Shed::DiskShort => "disk_short",
        }
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and describes every
/// metric; later calls (a second node in the same test process) share it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(INGEST_REQUEST_EVENTS.into()),
                        &COUNT_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(WAL_WRITE_SETS_PER_FLUSH.into()),
                        &COUNT_BUCKETS,
                    )
                });
            // the bucket lists are constants and not empty, so this cannot fail
            let builder = builder.unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics shows only window values"
                );
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        EVENTS_TOTAL,
        Unit::Count,
        "events by outcome (accepted, duplicate, late, quarantined, rejected)"
    );
    describe_counter!(
        EVENTS_QUARANTINED_BY_REASON_TOTAL,
        Unit::Count,
        "quarantined events by reason"
    );
    describe_counter!(
        EVENTS_REJECTED_BY_REASON_TOTAL,
        Unit::Count,
        "rejected events by reason"
    );
    describe_counter!(
        REQUESTS_SHED_TOTAL,
        Unit::Count,
        "requests refused to shed load (429/503), by limit"
    );
    describe_histogram!(
        INGEST_REQUEST_SECONDS,
        Unit::Seconds,
        "POST /v1/events from receipt to response, answered requests"
    );
    describe_histogram!(
        INGEST_REQUEST_EVENTS,
        Unit::Count,
        "events in one POST /v1/events"
    );
    describe_histogram!(
        WAL_FLUSH_SECONDS,
        Unit::Seconds,
        "write and flush of one group of write sets"
    );
    describe_histogram!(
        WAL_WRITE_SETS_PER_FLUSH,
        Unit::Count,
        "write sets (batches) that shared one flush"
    );
    describe_histogram!(
        SNAPSHOT_SECONDS,
        Unit::Seconds,
        "taking and writing one snapshot"
    );
    describe_gauge!(SNAPSHOT_BYTES, Unit::Bytes, "size of the last snapshot");
    describe_gauge!(TENANTS, Unit::Count, "tenants serving now");
    describe_counter!(
        ENRICHMENT_LOOKUPS_TOTAL,
        Unit::Count,
        "enrichment lookups of acknowledged batches, by outcome (hit, unknown, quarantined)"
    );
    describe_gauge!(
        RECOVERY_SECONDS,
        Unit::Seconds,
        "duration of the recovery at the last start"
    );
    describe_counter!(
        ACTOR_MESSAGES_TOTAL,
        Unit::Count,
        "actor messages handled, by actor kind"
    );
    describe_gauge!(
        QUARANTINE_EVENTS,
        Unit::Count,
        "events in the quarantine, by tenant"
    );
    describe_gauge!(
        ALERT_FIRING,
        Unit::Count,
        "alerts firing, by tenant, rule and severity (with `by`, one per dim value)"
    );
    describe_counter!(
        AUDIT_LARGE_READS_TOTAL,
        Unit::Count,
        "reads returning at least audit.large_read_rows rows, by tenant"
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        Unit::Count,
        "requests answered 401 or 403, by status"
    );
    describe_counter!(
        AUTH_FAILURE_BURSTS_TOTAL,
        Unit::Count,
        "addresses that got more than audit.auth_failures_per_minute_max 401/403 answers in a minute"
    );
    describe_counter!(
        AUDIT_DROPPED_TOTAL,
        Unit::Count,
        "audit records not written because the disk was short"
    );
    describe_counter!(
        EXPERIMENT_SIGNALS_TOTAL,
        Unit::Count,
        "experiment signals written, by tenant and action (pause, stop, srm)"
    );
    describe_counter!(
        EXPERIMENT_UNATTRIBUTED_TOTAL,
        Unit::Count,
        "accepted events naming an experiment or variant the tenant does not have (counted as usual, attributed to none), by tenant and reason"
    );
    describe_gauge!(
        DEDUP_RUNS,
        Unit::Count,
        "de-duplication runs on disk, by tenant (each new id probes every run's filter)"
    );
    describe_gauge!(
        DEDUP_FILTER_BYTES,
        Unit::Bytes,
        "memory held by the filters of the de-duplication runs and their summary filter, by tenant"
    );
    describe_gauge!(
        DEDUP_RUNS_UNCOVERED,
        Unit::Count,
        "de-duplication runs not yet in their tenant's summary filter (each probed on its own), by tenant"
    );
    describe_counter!(
        DEDUP_MERGES_TOTAL,
        Unit::Count,
        "de-duplication runs merged into one, by tenant"
    );
    describe_counter!(
        QUARANTINE_EVICTED_TOTAL,
        Unit::Count,
        "quarantined events evicted because the tenant's quarantine was full"
    );
    describe_counter!(
        SERIES_FOLDED_TOTAL,
        Unit::Count,
        "breakdown updates folded into __other__ by the series cap"
    );
    describe_counter!(
        METRIC_APPLY_ERRORS_TOTAL,
        Unit::Count,
        "accepted events a metric could not record (an invariant broke)"
    );
    process_collector().describe();
    describe_counter!(
        TENANT_SERIES_DROPPED_TOTAL,
        Unit::Count,
        "tenant window samples left out of scrapes by prometheus.tenant_series_max"
    );
    describe_gauge!(
        LIVE_SESSIONS,
        Unit::Count,
        "open live WebSocket sessions, by tenant"
    );
    describe_gauge!(
        LIVE_SUBSCRIPTIONS,
        Unit::Count,
        "subscriptions held by live sessions"
    );
    describe_counter!(
        LIVE_UPDATES_SENT_TOTAL,
        Unit::Count,
        "snapshot and update messages sent to live sessions"
    );
    describe_counter!(LIVE_UPDATES_CONFLATED_TOTAL, Unit::Count, "frames a live subscription skipped because a newer one superseded them (latest value wins)");
}

pub fn count_outcome(outcome: Outcome, reason: Option<Reason>, events: u64) {
    if events == 0 {
        return;
    }
    counter!(EVENTS_TOTAL, "outcome" => outcome.as_str()).increment(events);
    match (outcome, reason) {
        (Outcome::Quarantined, Some(reason)) => {
            counter!(EVENTS_QUARANTINED_BY_REASON_TOTAL, "reason" => reason.as_str())
                .increment(events)
        }
        (Outcome::Rejected, Some(reason)) => {
            counter!(EVENTS_REJECTED_BY_REASON_TOTAL, "reason" => reason.as_str()).increment(events)
        }
        _ => {}
    }
}

pub fn count_shed(shed: Shed) {
    counter!(REQUESTS_SHED_TOTAL, "limit" => shed.as_str()).increment(1);
}

pub fn record_ingest(seconds: f64, events: usize) {
    histogram!(INGEST_REQUEST_SECONDS).record(seconds);
    histogram!(INGEST_REQUEST_EVENTS).record(events as f64);
}

pub fn record_flush(seconds: f64, write_sets: usize) {
    histogram!(WAL_FLUSH_SECONDS).record(seconds);
    histogram!(WAL_WRITE_SETS_PER_FLUSH).record(write_sets as f64);
}

/// The lookups one tenant's batch made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupCounts {
    pub hits: u64,
    pub unknown: u64,
    pub quarantined: u64,
}

pub fn count_lookups(tenant: &str, counts: LookupCounts) {
    for (outcome, count) in [
        ("hit", counts.hits),
        ("unknown", counts.unknown),
        ("quarantined", counts.quarantined),
    ] {
        if count > 0 {
            counter!(ENRICHMENT_LOOKUPS_TOTAL, "tenant" => tenant.to_string(), "outcome" => outcome)
                .increment(count);
        }
    }
}

pub fn set_tenants(count: usize) {
    gauge!(TENANTS).set(count as f64);
}

pub fn record_snapshot(seconds: f64, bytes: usize) {
    histogram!(SNAPSHOT_SECONDS).record(seconds);
    gauge!(SNAPSHOT_BYTES).set(bytes as f64);
}

pub fn record_recovery(seconds: f64) {
    gauge!(RECOVERY_SECONDS).set(seconds);
}

pub fn count_actor_message(actor: &'static str) {
    counter!(ACTOR_MESSAGES_TOTAL, "actor" => actor).increment(1);
}

pub fn set_alert_firing(tenant: &str, rule: &str, severity: &str, firing: usize) {
    gauge!(
        ALERT_FIRING,
        "tenant" => tenant.to_string(),
        "rule" => rule.to_string(),
        "severity" => severity.to_string()
    )
    .set(firing as f64);
}

/// A histogram of seconds kept in atomics: a batch is bucketed first and
/// added with one `fetch_add` per bucket it touched, so that counting a
/// million events a second costs a few atomics a batch (the exporter's own
/// histograms keep every sample until an upkeep). Rendered with the tenant
/// values on `/metrics` (`http/prometheus.rs`).
#[derive(Debug, Default)]
pub struct SecondsHistogram {
    /// Per bucket of `FRESHNESS_BUCKETS`, then the overflow.
    counts: [std::sync::atomic::AtomicU64; FRESHNESS_BUCKETS.len() + 1],
    sum_micros: std::sync::atomic::AtomicU64,
}

impl SecondsHistogram {
    /// Adds lags in milliseconds.
    pub fn record_ms(&self, lags_ms: impl Iterator<Item = i64>) {
        use std::sync::atomic::Ordering;
        let mut counts = [0u64; FRESHNESS_BUCKETS.len() + 1];
        let mut sum_micros = 0u64;
        for lag_ms in lags_ms {
            let lag_ms = lag_ms.max(0) as u64;
            let seconds = lag_ms as f64 / 1000.0;
            let index = FRESHNESS_BUCKETS
                .iter()
                .position(|bound| seconds <= *bound)
                .unwrap_or(FRESHNESS_BUCKETS.len());
            counts[index] += 1;
            sum_micros = sum_micros.saturating_add(lag_ms.saturating_mul(1000));
        }
        for (bucket, count) in self.counts.iter().zip(counts) {
            if count > 0 {
                bucket.fetch_add(count, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add(sum_micros, Ordering::Relaxed);
    }

    /// `(upper bound, cumulative count)` per bucket (the last is `+Inf`), the
    /// sum in seconds and the count.
    pub fn read(&self) -> (Vec<(f64, u64)>, f64, u64) {
        use std::sync::atomic::Ordering;
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (index, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = FRESHNESS_BUCKETS
                .get(index)
                .copied()
                .unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (buckets, sum, cumulative)
    }
}

pub fn count_large_read(tenant: &str) {
    counter!(AUDIT_LARGE_READS_TOTAL, "tenant" => tenant.to_string()).increment(1);
}

pub fn count_auth_failure(status: u16) {
    counter!(AUTH_FAILURES_TOTAL, "status" => status.to_string()).increment(1);
}

pub fn count_auth_failure_burst() {
    counter!(AUTH_FAILURE_BURSTS_TOTAL).increment(1);
}

pub fn count_audit_dropped(records: u64) {
    counter!(AUDIT_DROPPED_TOTAL).increment(records);
}

pub fn count_signal(tenant: &str, action: &'static str) {
    counter!(EXPERIMENT_SIGNALS_TOTAL, "tenant" => tenant.to_string(), "action" => action)
        .increment(1);
}

pub fn count_unattributed(tenant: &str, reason: &'static str, events: u64) {
    if events > 0 {
        counter!(EXPERIMENT_UNATTRIBUTED_TOTAL, "tenant" => tenant.to_string(), "reason" => reason)
            .increment(events);
    }
}

pub fn set_dedup_runs(tenant: &str, runs: usize, uncovered: usize, filter_bytes: usize) {
    gauge!(DEDUP_RUNS, "tenant" => tenant.to_string()).set(runs as f64);
    gauge!(DEDUP_RUNS_UNCOVERED, "tenant" => tenant.to_string()).set(uncovered as f64);
    gauge!(DEDUP_FILTER_BYTES, "tenant" => tenant.to_string()).set(filter_bytes as f64);
}

pub fn count_dedup_merge(tenant: &str) {
    counter!(DEDUP_MERGES_TOTAL, "tenant" => tenant.to_string()).increment(1);
}

pub fn set_quarantine_size(tenant: &str, events: usize) {
    gauge!(QUARANTINE_EVENTS, "tenant" => tenant.to_string()).set(events as f64);
}

pub fn count_quarantine_evicted(tenant: &str, evicted: u64) {
    if evicted > 0 {
        counter!(QUARANTINE_EVICTED_TOTAL, "tenant" => tenant.to_string()).increment(evicted);
    }
}

pub fn count_folded(tenant: &str, metric: &str, folded: u64) {
    if folded > 0 {
        counter!(SERIES_FOLDED_TOTAL, "tenant" => tenant.to_string(), "metric" => metric.to_string())
            .increment(folded);
    }
}

pub fn count_apply_errors(metric: &str, errors: u64) {
    if errors > 0 {
        counter!(METRIC_APPLY_ERRORS_TOTAL, "metric" => metric.to_string()).increment(errors);
    }
}

pub fn set_live_sessions(tenant: &str, sessions: usize) {
    gauge!(LIVE_SESSIONS, "tenant" => tenant.to_string()).set(sessions as f64);
}

pub fn add_live_subscriptions(delta: f64) {
    gauge!(LIVE_SUBSCRIPTIONS).increment(delta);
}

pub fn count_live_update(conflated: u64) {
    counter!(LIVE_UPDATES_SENT_TOTAL).increment(1);
    if conflated > 0 {
        counter!(LIVE_UPDATES_CONFLATED_TOTAL).increment(conflated);
    }
}

pub fn count_tenant_series_dropped(samples: u64) {
    counter!(TENANT_SERIES_DROPPED_TOTAL).increment(samples);
}

fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Sets the standard process metrics (`process_resident_memory_bytes`,
/// `process_cpu_seconds_total`, `process_open_fds`, …) of this process, as
/// metrics-process reads them.
pub fn collect_process_metrics() {
    process_collector().collect();
}
