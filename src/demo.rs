//! `tally serve --demo`: synthetic traffic for the `demo` tenant, so that a
//! newcomer who opens `/wall#token=demo-key` sees numbers move. Events go
//! through validation, de-duplication, the log and the windows like any others.
//! Must not: run unless asked, or push past the tenant's in-flight budget (a
//! busy tick is skipped).

use std::sync::Arc;
use std::time::Duration;

use crate::actors::tenant::IngestBatch;
use crate::actors::InFlight;
use crate::domain::event::{parse_event, validate_event};
use crate::node::Node;

pub const DEMO_TENANT: &str = "demo";

/// A small deterministic generator (no randomness crate needed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound.max(1)
    }
}

/// Posts a few events every 200 ms until the node stops.
pub async fn run(node: Arc<Node>) {
    let Some(tenant) = node.tenants.get(DEMO_TENANT) else {
        tracing::warn!("--demo: there is no tenant named demo; no traffic");
        return;
    };
    let currency = tenant.context.currency.clone();
    let mut rng = Lcg(node.now_ms() as u64);
    let mut sequence = 0u64;
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    loop {
        ticks.tick().await;
        let now_ms = node.now_ms();
        let mut lines = Vec::new();
        for _ in 0..(1 + rng.below(4)) {
            sequence += 1;
            let device = ["ios", "android", "web"][rng.below(3) as usize];
            lines.push(match rng.below(10) {
                0..=4 => format!(
                    r#"{{"id":"demo-{now_ms}-{sequence}","type":"order.completed","amount":{},"currency":"{currency}","dims":{{"device":"{device}"}}}}"#,
                    500 + rng.below(20_000)
                ),
                5..=6 => format!(r#"{{"id":"demo-{now_ms}-{sequence}","type":"payment.captured"}}"#),
                7 => format!(r#"{{"id":"demo-{now_ms}-{sequence}","type":"payment.failed","dims":{{"method":"card"}}}}"#),
                _ => format!(
                    r#"{{"id":"demo-{now_ms}-{sequence}","type":"checkout.completed","value":{},"dims":{{"device":"{device}"}}}}"#,
                    120 + rng.below(600)
                ),
            });
        }
        let mut events = Vec::new();
        for (index, line) in lines.iter().enumerate() {
            if let Ok(event) = parse_event(line.as_bytes())
                .and_then(|raw| validate_event(&raw, &tenant.context.validation(), now_ms, now_ms))
            {
                events.push((index as u32, event));
            }
        }
        let Ok(permit) = Arc::clone(&tenant.batch_permits).try_acquire_owned() else {
            continue;
        };
        let batch = IngestBatch {
            checked: None,
            in_flight: InFlight::new(permit),
            now_ms,
            events,
            quarantined: Vec::new(),
        };
        if let Ok(Err(error)) = tenant.actor.send(batch).await {
            tracing::warn!(%error, "--demo: a batch was refused");
        }
    }
}
