//! `[ingest]`: events per request, clock skew, de-duplication, batches in flight, dims.
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub max_events_per_request: usize,
    pub max_clock_skew_ms: i64,
    pub dedup_horizon_s: i64,
    pub dedup_ids_max: usize,
    pub tenant_batches_inflight_max: usize,
    pub dims_per_event_max: usize,
    pub dim_key_bytes_max: usize,
    pub dim_value_bytes_max: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_events_per_request: 100_000,
            max_clock_skew_ms: 300_000,
            dedup_horizon_s: 86_400,
            dedup_ids_max: 2_000_000,
            tenant_batches_inflight_max: 64,
            dims_per_event_max: 16,
            dim_key_bytes_max: 32,
            dim_value_bytes_max: 128,
        }
    }
}
