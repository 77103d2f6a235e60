//! `[export]`: CSV exports of reads (API.md §10, docs/api.md "Export").
//! Every key is documented with its unit in config/default.toml.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Rows one CSV export may have; more is 400 `export_too_large`.
    pub rows_max: usize,
    /// Bytes of CSV text made at a time, as the client reads.
    pub chunk_bytes: usize,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            rows_max: 100_000,
            chunk_bytes: 64 * 1024,
        }
    }
}
