//! What several benches set up the same way: the default config of a node on
//! loopback with its data in `data_dir` and room for every id a bench sends.

#![allow(dead_code)] // each bench uses only part of this

use tally::config::Config;

/// The default config (config/default.toml), as shipped.
pub fn default_config() -> Config {
    // the shipped file is valid: a test keeps it equal to the code defaults
    Config::parse(include_str!("../../config/default.toml"), Vec::new()).unwrap()
}

/// The default config for an in-process node on 127.0.0.1:0.
pub fn node_config(data_dir: &std::path::Path, dedup_ids_max: usize) -> Config {
    let mut config = default_config();
    config.server.listen = "127.0.0.1:0".into();
    config.storage.data_dir = data_dir.to_path_buf();
    config.ingest.dedup_table_bytes_max = dedup_ids_max * 128;
    config
}
