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
    /// Memory one tenant's table of recent ids may take (`dedup_ids_max`).
    pub dedup_table_bytes_max: usize,
    pub tenant_batches_inflight_max: usize,
    /// Events one tenant may send a second on average (its burst: as many).
    pub tenant_events_per_second_max: u64,
    pub dims_per_event_max: usize,
    pub dim_key_bytes_max: usize,
    pub dim_value_bytes_max: usize,
}

/// What one id in a tenant's table costs at most, in bytes: 32 in the hash
/// table at its load, 16 in the expiry index, and growth slack (55 to 110
/// measured, docs/operations.md), rounded up.
pub const DEDUP_TABLE_BYTES_PER_ID: usize = 128;

impl IngestConfig {
    /// The most ids one tenant's table holds: its byte budget over the most
    /// an id costs.
    pub fn dedup_ids_max(&self) -> usize {
        (self.dedup_table_bytes_max / DEDUP_TABLE_BYTES_PER_ID).max(1)
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_events_per_request: 100_000,
            max_clock_skew_ms: 300_000,
            dedup_horizon_s: 86_400,
            dedup_table_bytes_max: 512 << 20,
            tenant_batches_inflight_max: 64,
            tenant_events_per_second_max: 2_000_000,
            dims_per_event_max: 16,
            dim_key_bytes_max: 32,
            dim_value_bytes_max: 128,
        }
    }
}
