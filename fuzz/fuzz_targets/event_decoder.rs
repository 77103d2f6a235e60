//! One event's bytes through the decoder and the validator with the shipped
//! catalogue: any outcome but a panic is fine; a valid event keeps the limits.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tally::domain::event::{parse_event, validate_event, ID_BYTES_MAX};
use tally::domain::tenant::TenantContext;

fn context() -> &'static TenantContext {
    static CONTEXT: OnceLock<std::sync::Arc<TenantContext>> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let text = include_str!("../../config/default.toml");
        let config = tally::config::Config::parse(text, Vec::new()).expect("default config parses");
        let checked = config.check().expect("default config checks");
        checked.tenant_contexts().remove(0)
    })
}

fuzz_target!(|data: &[u8]| {
    let now_ms = 1_763_805_600_000;
    if let Ok(raw) = parse_event(data) {
        if let Ok(event) = validate_event(&raw, &context().validation(), now_ms, now_ms) {
            assert!(!event.id.is_empty() && event.id.len() <= ID_BYTES_MAX);
            assert!(!event.id.chars().any(char::is_control));
        }
    }
});
