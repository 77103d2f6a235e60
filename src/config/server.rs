//! `[server]`: the API listener, request bodies and their budgets, shutdown.
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub ingest_bytes_inflight_max: usize,
    pub body_read_timeout_ms: u64,
    /// How long a client may take to send a request's line and headers.
    pub header_read_timeout_ms: u64,
    /// How long one write to a client may wait for it to read.
    pub write_timeout_ms: u64,
    /// Open HTTP connections at once, node-wide (live sockets have their own caps).
    pub connections_max: usize,
    pub shutdown_grace_ms: u64,
    pub retry_after_s: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7700".into(),
            max_body_bytes: 8 * 1024 * 1024,
            ingest_bytes_inflight_max: 256 * 1024 * 1024,
            body_read_timeout_ms: 30_000,
            header_read_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            connections_max: 16_384,
            shutdown_grace_ms: 10_000,
            retry_after_s: 1,
        }
    }
}
