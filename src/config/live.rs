//! `[live]`: live push ticks, sessions, subscriptions, messages, pings, replays.
//! Every key is documented with its unit in config/default.toml; `Config::check`
//! checks the limits.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveConfig {
    pub tick_ms: u64,
    pub sessions_per_tenant_max: usize,
    pub subscriptions_per_session_max: usize,
    pub message_bytes_max: usize,
    pub ping_interval_s: u64,
    pub idle_timeout_s: u64,
    pub replay_records_max: usize,
    pub send_timeout_ms: u64,
    /// Live sessions open at once, node-wide.
    pub sessions_max: usize,
    /// Live sockets still to send their auth message, at once, node-wide.
    pub unauthenticated_max: usize,
    /// How long an unauthenticated socket has to send its `auth` message.
    pub auth_timeout_ms: u64,
    /// Messages a client may send a second, per session.
    pub messages_per_second_max: u32,
    /// Milliseconds between the server's `heartbeat` messages to a session.
    pub heartbeat_interval_ms: u64,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            tick_ms: 50,
            sessions_per_tenant_max: 1000,
            subscriptions_per_session_max: 16,
            message_bytes_max: 65_536,
            ping_interval_s: 15,
            idle_timeout_s: 45,
            replay_records_max: 1000,
            send_timeout_ms: 5000,
            sessions_max: 20_000,
            unauthenticated_max: 1_000,
            auth_timeout_ms: 5_000,
            messages_per_second_max: 20,
            heartbeat_interval_ms: 5_000,
        }
    }
}
