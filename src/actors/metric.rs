//! MetricActor: owns the window state of one metric of one tenant.
//! Messages: `ApplyEvents` (accepted events of a batch), `ReadMetric` (windows,
//! total or broken down by a dim), `ReadSeries` (points for sparklines),
//! `SetWatched` and `ReadVariants` (the experiments counted per variant).
//! Must not: decide outcomes (the TenantActor did) or read the clock: every
//! message carries `now_ms`, and state only moves forward in time.

use std::sync::Arc;

use actix::prelude::*;

use crate::domain::catalogue::MetricDef;
use crate::domain::event::ValidEvent;
use crate::domain::metric::{
    HistoryExtent, MetricExport, MetricState, SeriesPoints, SeriesReading, SeriesSettings,
    VariantSetExport, VariantsReading, Watched,
};
use crate::domain::time::SlidingWindow;
use crate::telemetry;

use super::InFlight;

pub struct MetricActor {
    tenant_id: Arc<str>,
    name: String,
    state: MetricState,
    now_ms: i64,
}

impl MetricActor {
    pub fn new(
        tenant_id: Arc<str>,
        index: usize,
        def: &MetricDef,
        settings: SeriesSettings,
        now_ms: i64,
        watched: &[Watched],
    ) -> Self {
        let mut state = MetricState::new(index, def, settings, now_ms);
        state.watch(watched, now_ms);
        MetricActor {
            tenant_id,
            name: def.name.clone(),
            state,
            now_ms,
        }
    }

    /// A metric actor over recovered state.
    pub fn from_state(tenant_id: Arc<str>, name: String, state: MetricState, now_ms: i64) -> Self {
        MetricActor {
            tenant_id,
            name,
            state,
            now_ms,
        }
    }

    /// Time only moves forward inside a metric, whatever order messages carry.
    fn advance(&mut self, now_ms: i64) -> i64 {
        self.now_ms = self.now_ms.max(now_ms);
        self.now_ms
    }
}

impl Actor for MetricActor {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct ApplyEvents {
    /// The batch's time, as its log record keeps it.
    pub now_ms: i64,
    pub events: Arc<Vec<ValidEvent>>,
}

impl Handler<ApplyEvents> for MetricActor {
    type Result = ();

    fn handle(&mut self, message: ApplyEvents, _: &mut Context<Self>) {
        telemetry::count_actor_message("metric");
        let now_ms = self.advance(message.now_ms);
        let report = self
            .state
            .apply_batch(&message.events, message.now_ms, now_ms);
        telemetry::count_folded(&self.tenant_id, &self.name, report.values_folded);
        if report.events_refused > 0 {
            tracing::error!(
                tenant = %self.tenant_id,
                metric = %self.name,
                events = report.events_refused,
                "accepted events refused by the windows"
            );
            telemetry::count_apply_errors(&self.name, report.events_refused);
        }
    }
}

// A reply moved once per read; boxing the reading would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum MetricRead {
    Total(SeriesReading),
    /// `None` when the metric keeps no breakdown by that dim.
    Breakdown(Option<Vec<(String, SeriesReading)>>),
}

#[derive(Message)]
#[rtype(result = "MetricRead")]
pub struct ReadMetric {
    pub now_ms: i64,
    pub by: Option<String>,
    pub in_flight: InFlight,
}

impl Handler<ReadMetric> for MetricActor {
    type Result = MessageResult<ReadMetric>;

    fn handle(&mut self, message: ReadMetric, _: &mut Context<Self>) -> Self::Result {
        telemetry::count_actor_message("metric");
        let now_ms = self.advance(message.now_ms);
        MessageResult(match message.by {
            None => MetricRead::Total(self.state.read(now_ms)),
            Some(dim) => MetricRead::Breakdown(self.state.read_breakdown(&dim, now_ms)),
        })
    }
}

/// The state for a snapshot (sent after every apply it must include): the
/// series (their history whole, or only the chunks of `chunk_s` seconds
/// changed since the last export: `MetricState::export_history`), and the
/// per-variant counts of the experiments watched.
#[derive(Message)]
#[rtype(result = "(MetricExport, HistoryExtent, Vec<VariantSetExport>)")]
pub struct ExportState {
    pub whole_history: bool,
    pub chunk_s: i64,
}

impl Handler<ExportState> for MetricActor {
    type Result = MessageResult<ExportState>;

    fn handle(&mut self, message: ExportState, _: &mut Context<Self>) -> Self::Result {
        let (export, extent) = self
            .state
            .export_history(message.whole_history, message.chunk_s);
        MessageResult((export, extent, self.state.export_variants()))
    }
}

/// The experiments of the tenant (each with the metrics it guards); sent by
/// the tenant actor before any batch stamped at or after their start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetWatched(pub Arc<Vec<Watched>>);

impl Handler<SetWatched> for MetricActor {
    type Result = ();

    fn handle(&mut self, message: SetWatched, _: &mut Context<Self>) {
        let now_ms = self.now_ms;
        self.state.watch(&message.0, now_ms);
    }
}

/// One experiment's counts per variant (`None`: this metric does not count it).
#[derive(Message)]
#[rtype(result = "Option<VariantsReading>")]
pub struct ReadVariants {
    pub now_ms: i64,
    pub watched: Watched,
    /// Also the `15m` counts (a look does not need them).
    pub windows: bool,
    pub in_flight: InFlight,
}

impl Handler<ReadVariants> for MetricActor {
    type Result = MessageResult<ReadVariants>;

    fn handle(&mut self, message: ReadVariants, _: &mut Context<Self>) -> Self::Result {
        let now_ms = self.advance(message.now_ms);
        MessageResult(
            self.state
                .read_variants(&message.watched, message.windows, now_ms),
        )
    }
}

#[derive(Message)]
#[rtype(result = "SeriesPoints")]
pub struct ReadSeries {
    pub now_ms: i64,
    pub window: SlidingWindow,
    pub step_s: i64,
    pub in_flight: InFlight,
}

impl Handler<ReadSeries> for MetricActor {
    type Result = MessageResult<ReadSeries>;

    fn handle(&mut self, message: ReadSeries, _: &mut Context<Self>) -> Self::Result {
        let now_ms = self.advance(message.now_ms);
        MessageResult(
            self.state
                .series_points(message.window, message.step_s, now_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalogue::{Catalogue, MetricKind};
    use crate::domain::window::Tally;

    #[actix::test]
    async fn applies_then_reads_in_mailbox_order() {
        let catalogue = Catalogue::new(vec![MetricDef {
            name: "orders".into(),
            kind: MetricKind::Count,
            types: vec!["order.completed".into()],
            numerator: vec![],
            dims: vec![],
        }]);
        let settings = SeriesSettings {
            ahead_s: 300,
            tz: chrono_tz::Tz::UTC,
            histogram_value_max: 1000,
            series_max: 10,
        };
        let now_ms = 1_763_805_600_000;
        let actor = MetricActor::new(
            "t".into(),
            0,
            &catalogue.metrics()[0],
            settings,
            now_ms,
            &[],
        )
        .start();
        let event = ValidEvent {
            id: "a".into(),
            event_type: "order.completed".into(),
            ts_ms: now_ms,
            amount: None,
            value: None,
            value_integer: None,
            dims: vec![],
            experiments: vec![],
            route: catalogue.route("order.completed"),
        };
        // not awaited: the read behind it in the mailbox must still see it
        let apply = actor.send(ApplyEvents {
            now_ms,
            events: Arc::new(vec![event.clone(), event]),
        });
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let in_flight = InFlight::new(Arc::clone(&permits).try_acquire_owned().unwrap());
        let read = actor
            .send(ReadMetric {
                now_ms,
                by: None,
                in_flight,
            })
            .await
            .unwrap();
        // the read's place in the budget is free once the actor handled it
        assert_eq!(permits.available_permits(), 1);
        apply.await.unwrap();
        let MetricRead::Total(SeriesReading::Counter(counter)) = read else {
            panic!("orders is a counter total");
        };
        assert_eq!(counter.sec30.current, Tally { sum: 0, count: 2 });
    }
}
