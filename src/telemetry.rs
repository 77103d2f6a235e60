//! Node telemetry: every metric name and its help text in one place, recorded
//! through the `metrics` facade. The Prometheus exporter is installed by the node
//! at start-up (see the Prometheus issue); until then recording is a no-op.
//! Label values are bounded: outcomes and reasons are closed enums, metric names
//! come from config.

use metrics::{counter, describe_counter, Unit};

use crate::domain::event::Reason;

pub const EVENTS_TOTAL: &str = "tally_events_total";
pub const EVENTS_QUARANTINED_BY_REASON_TOTAL: &str = "tally_events_quarantined_by_reason_total";
pub const EVENTS_REJECTED_BY_REASON_TOTAL: &str = "tally_events_rejected_by_reason_total";
pub const INGEST_SHED_TOTAL: &str = "tally_ingest_shed_total";
pub const QUARANTINE_EVICTED_TOTAL: &str = "tally_quarantine_evicted_total";
pub const SERIES_FOLDED_TOTAL: &str = "tally_series_folded_total";
pub const METRIC_APPLY_ERRORS_TOTAL: &str = "tally_metric_apply_errors_total";

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

pub fn describe() {
    describe_counter!(EVENTS_TOTAL, Unit::Count, "events by outcome");
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
        INGEST_SHED_TOTAL,
        Unit::Count,
        "ingest requests refused to shed load, by status"
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

pub fn count_shed(status: u16) {
    counter!(INGEST_SHED_TOTAL, "status" => status.to_string()).increment(1);
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
