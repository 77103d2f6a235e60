//! The metric catalogue as the engine uses it: metric definitions compiled from
//! config, and for each event type the metrics it feeds (as bit masks) and what
//! fields it must carry for them.
//! Must not: parse config files or hold window state. Definitions are checked by
//! `config::validate` before a catalogue is built.

use std::collections::HashMap;

/// At most this many metrics, so that an event's routing fits one `u64` mask.
pub const METRICS_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SumField {
    /// `amount`, integer minor units in the tenant's currency.
    Amount,
    /// `value`, which must then be an integer (e.g. in-app currency units).
    Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MetricKind {
    Sum {
        field: SumField,
    },
    Count,
    /// `sum` of a window holds the numerator count, `count` the denominator count.
    Ratio,
    Histogram,
    /// `sum_metric` / `count_metric` × `scale`, derived when read.
    Mean {
        sum_metric: usize,
        count_metric: usize,
        scale: u32,
    },
}

impl MetricKind {
    pub fn name(&self) -> &'static str {
        match self {
            MetricKind::Sum { .. } => "sum",
            MetricKind::Count => "count",
            MetricKind::Ratio => "ratio",
            MetricKind::Histogram => "histogram",
            MetricKind::Mean { .. } => "mean",
        }
    }

    /// True for the kinds that keep window state of their own.
    pub fn has_state(&self) -> bool {
        !matches!(self, MetricKind::Mean { .. })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricDef {
    pub name: String,
    pub kind: MetricKind,
    /// The event types counted (for ratios: the denominator).
    pub types: Vec<String>,
    /// Ratios only: the event types of the numerator.
    pub numerator: Vec<String>,
    /// Dimensions kept as breakdowns.
    pub dims: Vec<String>,
}

/// What one event type feeds, and what it must carry for that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeRoute {
    /// Bit `i`: the type is in metric `i`'s `types` (or ratio denominator).
    pub feeds: u64,
    /// Bit `i`: the type is in ratio metric `i`'s numerator.
    pub feeds_numerator: u64,
    pub needs_amount: bool,
    pub needs_integer_value: bool,
    pub needs_histogram_value: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Catalogue {
    metrics: Vec<MetricDef>,
    routes: HashMap<String, TypeRoute>,
}

impl Catalogue {
    /// Builds the routes; `metrics` must already be validated (at most
    /// `METRICS_MAX`, mean references pointing at sum and count metrics).
    pub fn new(metrics: Vec<MetricDef>) -> Catalogue {
        let mut routes: HashMap<String, TypeRoute> = HashMap::new();
        for (index, metric) in metrics.iter().enumerate().take(METRICS_MAX) {
            let bit = 1u64 << index;
            for event_type in &metric.types {
                let route = routes.entry(event_type.clone()).or_default();
                route.feeds |= bit;
                match metric.kind {
                    MetricKind::Sum {
                        field: SumField::Amount,
                    } => route.needs_amount = true,
                    MetricKind::Sum {
                        field: SumField::Value,
                    } => route.needs_integer_value = true,
                    MetricKind::Histogram => route.needs_histogram_value = true,
                    _ => {}
                }
            }
            for event_type in &metric.numerator {
                routes
                    .entry(event_type.clone())
                    .or_default()
                    .feeds_numerator |= bit;
            }
        }
        Catalogue { metrics, routes }
    }

    pub fn metrics(&self) -> &[MetricDef] {
        &self.metrics
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.metrics.iter().position(|metric| metric.name == name)
    }

    /// The route of an event type; a type no metric names feeds nothing.
    pub fn route(&self, event_type: &str) -> TypeRoute {
        self.routes.get(event_type).copied().unwrap_or_default()
    }

    /// The dims a metric can be broken down by. A mean can use the dims its sum
    /// and its count metric both keep.
    pub fn breakdown_dims(&self, index: usize) -> Vec<String> {
        let Some(metric) = self.metrics.get(index) else {
            return Vec::new();
        };
        match metric.kind {
            MetricKind::Mean {
                sum_metric,
                count_metric,
                ..
            } => {
                let count_dims = self.breakdown_dims(count_metric);
                self.breakdown_dims(sum_metric)
                    .into_iter()
                    .filter(|dim| count_dims.contains(dim))
                    .collect()
            }
            _ => metric.dims.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, kind: MetricKind, types: &[&str], numerator: &[&str]) -> MetricDef {
        MetricDef {
            name: name.into(),
            kind,
            types: types.iter().map(|t| t.to_string()).collect(),
            numerator: numerator.iter().map(|t| t.to_string()).collect(),
            dims: vec!["device".into()],
        }
    }

    #[test]
    fn routes_name_every_metric_a_type_feeds() {
        let catalogue = Catalogue::new(vec![
            def(
                "gmv",
                MetricKind::Sum {
                    field: SumField::Amount,
                },
                &["order.completed"],
                &[],
            ),
            def("orders", MetricKind::Count, &["order.completed"], &[]),
            def(
                "failure_rate",
                MetricKind::Ratio,
                &["payment.failed", "payment.captured"],
                &["payment.failed"],
            ),
            def(
                "latency",
                MetricKind::Histogram,
                &["checkout.completed"],
                &[],
            ),
        ]);
        let order = catalogue.route("order.completed");
        assert_eq!(order.feeds, 0b0011);
        assert!(order.needs_amount);
        assert!(!order.needs_histogram_value);
        let failed = catalogue.route("payment.failed");
        assert_eq!((failed.feeds, failed.feeds_numerator), (0b0100, 0b0100));
        let captured = catalogue.route("payment.captured");
        assert_eq!((captured.feeds, captured.feeds_numerator), (0b0100, 0));
        assert!(catalogue.route("checkout.completed").needs_histogram_value);
        assert_eq!(catalogue.route("nobody.cares"), TypeRoute::default());
    }
}
