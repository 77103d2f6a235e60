//! `tally serve --demo`: synthetic traffic for the `demo` tenant, so that a
//! newcomer who opens `/wall#token=demo-key` sees numbers move, and every few
//! minutes a planted incident (a GMV drop, a payment-failure spike, a device
//! gone silent) that the demo's alert rules fire on and resolve after. Events
//! go through validation, de-duplication, the log and the windows like any
//! others.
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

/// A planted incident of the demo's cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incident {
    None,
    /// Orders come at a quarter of their rate: `demo-gmv-drop` fires.
    GmvDrop,
    /// A third of payments fail: `demo-payment-failures` fires.
    PaymentFailures,
    /// The `web` device sends nothing: `demo-device-silent` fires for it.
    DeviceSilent,
}

/// The demo's cycle: 7 minutes, an incident in three of its minutes, each
/// followed by quiet so that its alert resolves.
pub const CYCLE_S: i64 = 420;

/// The incident at `now_ms` of the cycle.
pub fn incident_at(now_ms: i64) -> Incident {
    match now_ms.div_euclid(1000).rem_euclid(CYCLE_S) {
        60..=119 => Incident::GmvDrop,
        180..=239 => Incident::PaymentFailures,
        300..=419 => Incident::DeviceSilent,
        _ => Incident::None,
    }
}

/// The rules the demo tenant gets with `--demo` (config rules, not stored):
/// 30-second windows, so that an incident fires within seconds.
pub fn alert_rules() -> Vec<crate::config::RuleConfig> {
    use crate::domain::alert::Condition;
    let rule = |id: &str, metric: &str, condition: Condition, for_s: i64, severity: &str| {
        crate::config::RuleConfig {
            id: id.into(),
            tenants: vec![DEMO_TENANT.into()],
            metric: metric.into(),
            window: "30s".into(),
            condition,
            by: None,
            min_count: 0,
            for_s,
            severity: severity.into(),
            runbook: Some("docs/alerts.md (a rule of serve --demo)".into()),
        }
    };
    let mut drop = rule(
        "demo-gmv-drop",
        "gmv",
        Condition::DropVsPrev { pct: 30.0 },
        10,
        "P1",
    );
    drop.min_count = 20;
    let mut failures = rule(
        "demo-payment-failures",
        "payment_failure_rate",
        Condition::Above { value: 0.05 },
        10,
        "P1",
    );
    failures.min_count = 20;
    let mut silent = rule(
        "demo-device-silent",
        "orders",
        Condition::Absent {},
        60,
        "P2",
    );
    silent.by = Some("device".into());
    vec![drop, failures, silent]
}

/// Posts a few events every 200 ms until the node stops: about 7 orders and
/// 5 payments a second (1 % failing), checkouts, and the cycle's incidents.
pub async fn run(node: Arc<Node>) {
    let Some(tenant) = node.tenant(DEMO_TENANT) else {
        tracing::warn!("--demo: there is no tenant named demo; no traffic");
        return;
    };
    let currency = tenant.context.currency.clone();
    let mut rng = Lcg(node.now_ms() as u64);
    let mut sequence = 0u64;
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let mut last_incident = Incident::None;
    loop {
        ticks.tick().await;
        let now_ms = node.now_ms();
        let incident = incident_at(now_ms);
        if incident != last_incident {
            tracing::info!(?incident, "--demo: planted incident");
            last_incident = incident;
        }
        let mut lines = Vec::new();
        let mut id = || {
            sequence += 1;
            format!("demo-{now_ms}-{sequence}")
        };
        let orders = match incident {
            Incident::GmvDrop => u64::from(rng.below(4) == 0),
            _ => 1 + rng.below(2),
        };
        for _ in 0..orders {
            // web takes a tenth of the orders: its silence alone is no GMV drop
            let device = match rng.below(20) {
                0..=8 => "ios",
                9..=17 => "android",
                _ => "web",
            };
            if incident == Incident::DeviceSilent && device == "web" {
                continue;
            }
            lines.push(format!(
                r#"{{"id":"{}","type":"order.completed","amount":{},"currency":"{currency}","dims":{{"device":"{device}"}}}}"#,
                id(),
                500 + rng.below(20_000)
            ));
        }
        let failing_in_100 = if incident == Incident::PaymentFailures {
            33
        } else {
            1
        };
        for _ in 0..rng.below(3) {
            let payment = if rng.below(100) < failing_in_100 {
                format!(
                    r#"{{"id":"{}","type":"payment.failed","dims":{{"method":"card"}}}}"#,
                    id()
                )
            } else {
                format!(
                    r#"{{"id":"{}","type":"payment.captured","dims":{{"method":"card"}}}}"#,
                    id()
                )
            };
            lines.push(payment);
        }
        if rng.below(2) == 0 {
            let device = ["ios", "android", "web"][rng.below(3) as usize];
            lines.push(format!(
                r#"{{"id":"{}","type":"checkout.completed","value":{},"dims":{{"device":"{device}"}}}}"#,
                id(),
                120 + rng.below(600)
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cycle_plants_each_incident_then_quiet() {
        let at = |second: i64| {
            incident_at(1_764_000_000_000 - 1_764_000_000_000 % (CYCLE_S * 1000) + second * 1000)
        };
        assert_eq!(at(0), Incident::None);
        assert_eq!(at(60), Incident::GmvDrop);
        assert_eq!(at(150), Incident::None);
        assert_eq!(at(200), Incident::PaymentFailures);
        assert_eq!(at(299), Incident::None);
        assert_eq!(at(419), Incident::DeviceSilent);
        assert_eq!(at(CYCLE_S), Incident::None);
    }

    #[test]
    fn the_demo_rules_check_against_the_default_catalogue() {
        let mut config =
            crate::config::Config::parse(include_str!("../config/default.toml"), Vec::new())
                .unwrap();
        config.alerts.extend(alert_rules());
        let checked = config.check().unwrap();
        assert_eq!(checked.rules_for(DEMO_TENANT).len(), 3);
    }
}
