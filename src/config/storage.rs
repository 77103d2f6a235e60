//! `[storage]`: the data directory, snapshots, group commit, record and cache sizes.
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub snapshot_interval_s: u64,
    pub snapshots_kept: usize,
    pub group_commit: bool,
    pub record_bytes_max: usize,
    pub cache_bytes: u64,
    pub disk_free_bytes_min: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./data"),
            snapshot_interval_s: 60,
            snapshots_kept: 2,
            group_commit: true,
            record_bytes_max: 1 << 30,
            cache_bytes: 1 << 30,
            disk_free_bytes_min: 256 << 20,
        }
    }
}
