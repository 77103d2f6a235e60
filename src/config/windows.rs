//! `[windows]`: series per metric and the histogram range.
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowsConfig {
    pub max_series_per_metric: usize,
    pub histogram_value_max: u64,
}

impl Default for WindowsConfig {
    fn default() -> Self {
        WindowsConfig {
            max_series_per_metric: 1000,
            histogram_value_max: 3_600_000,
        }
    }
}
