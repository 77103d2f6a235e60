//! Pure domain code: event rules, the metric catalogue, windows, histograms,
//! de-duplication, and the tenant core that decides every event's outcome. Everything takes `now` as an argument; nothing here touches
//! actix, tokio, sled or the clock.

pub mod alert;
pub mod catalogue;
pub mod dedup;
pub mod enrich;
pub mod event;
pub mod experiment;
pub mod guardrail;
pub mod histogram;
pub mod metric;
pub mod quarantine;
pub mod rate;
pub mod tenant;
pub mod time;
pub mod window;
