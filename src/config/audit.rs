//! `[audit]`: the audit trail's queue, retention and flags (docs/audit.md).
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Records waiting to be written; a reader waits for room past it.
    pub queue_max: usize,
    /// Seconds a record is kept.
    pub retention_s: i64,
    /// Records kept at most, node-wide; the oldest go first.
    pub records_max: u64,
    /// A read of at least this many rows is flagged `large`.
    pub large_read_rows: u64,
    /// 401/403 answers to one address in a minute past which it is a burst.
    pub auth_failures_per_minute_max: u32,
    /// Most records `GET /v1/audit` returns at once.
    pub list_limit_max: usize,
    /// Most records one page of `GET /v1/audit` looks at (a tenant's among
    /// many): past it the page is short and `next_since` moves on.
    pub list_scan_max: usize,
    /// Addresses whose 401/403 are counted at once; the counts are cleared
    /// when a new address would pass it.
    pub burst_addresses_max: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            queue_max: 65_536,
            retention_s: 90 * 86_400,
            records_max: 10_000_000,
            large_read_rows: 10_000,
            auth_failures_per_minute_max: 20,
            list_limit_max: 1_000,
            list_scan_max: 100_000,
            burst_addresses_max: 10_000,
        }
    }
}
