//! Scenario files and the seeded event stream they describe.
//!
//! Owns: the scenario format (TOML, `loadtest/scenarios/*.toml`), the event
//! generator (a fixed PRNG, so a seed always gives the same events), and the
//! reference model of what a target must count for the events acknowledged.
//! Must not know how a target is reached: `tally.rs` and `redis.rs` turn the
//! same batches into HTTP bodies or Redis commands.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tally::config::{MetricConfig, MetricKindName};

/// A load scenario, as written in a scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Seeds the event stream: the same seed gives the same events.
    pub seed: u64,
    /// Tenants `load0`, `load1`, …; batches go to them in turn.
    pub tenants: usize,
    /// How long events are offered, in seconds.
    pub duration_s: u64,
    /// Events offered per second; 0 = closed loop at the most the target acks
    /// (each connection sends its next batch when the last one is acked).
    pub rate_events_per_s: u64,
    /// Events per request (NDJSON batch) or per Redis pipeline.
    pub batch_events: usize,
    /// Concurrent HTTP requests or Redis connections.
    pub connections: usize,
    /// WebSocket clients subscribed to `orders` (today) of tenant `load0`.
    #[serde(default)]
    pub ws_clients: usize,
    /// Their `interval_ms`.
    #[serde(default = "default_ws_interval_ms")]
    pub ws_interval_ms: u64,
    /// Extra `TALLY_<SECTION>__<KEY>` overrides for the node.
    #[serde(default)]
    pub node_env: BTreeMap<String, String>,
    /// Added to every connection's stream number: runs of one scenario that
    /// follow each other (the soak's minutes) send distinct ids.
    #[serde(skip)]
    pub stream_offset: usize,
    /// Distinct values of each dim (`device-0` … `device-{n-1}`).
    pub cardinality: BTreeMap<String, u32>,
    /// The event mix: types with weights, their fields and dims.
    pub mix: Vec<EventKind>,
    /// A lookup the node does on ingest (`[[enrichments]]`), if any.
    #[serde(default)]
    pub enrichment: Option<ScenarioEnrichment>,
}

/// One enrichment: events carrying the `key` dim get the `adds` dims, value
/// `{add}-{k % cardinality(add)}` for key value `{key}-{k}`. The node looks
/// them up in a table the target loads before the run; with
/// `by_producer`, the producer sends them itself and the node has no
/// enrichment (the peer that `tally-loadtest enrich` measures against).
/// Either way the events counted, and so the expected windows, are the same.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioEnrichment {
    pub table: String,
    pub key: String,
    pub adds: Vec<String>,
    #[serde(skip)]
    pub by_producer: bool,
}

/// Longest run: the end check reads the `15m` window (with a minute to spare).
pub const DURATION_S_MAX: u64 = 840;

fn default_ws_interval_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventKind {
    #[serde(rename = "type")]
    pub event_type: String,
    pub weight: u32,
    /// `amount` in minor units, drawn uniformly from `[low, high]`.
    #[serde(default)]
    pub amount: Option<[i64; 2]>,
    /// Integer `value`, drawn uniformly from `[low, high]`.
    #[serde(default)]
    pub value: Option<[i64; 2]>,
    /// Dims the event carries; each must have a cardinality.
    #[serde(default)]
    pub dims: Vec<String>,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let scenario: Scenario =
            toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?;
        scenario.check()?;
        Ok(scenario)
    }

    /// Refuses what the generator or the end check cannot handle.
    pub fn check(&self) -> Result<(), String> {
        if self.tenants == 0 || self.batch_events == 0 || self.connections == 0 {
            return Err("tenants, batch_events and connections must be at least 1".into());
        }
        // the end check reads the 15 m window, which must still hold every event
        if self.duration_s == 0 || self.duration_s > DURATION_S_MAX {
            return Err(format!("duration_s must be 1 to {DURATION_S_MAX}"));
        }
        if self
            .rate_events_per_s
            .checked_mul(self.duration_s)
            .is_none()
        {
            return Err("rate_events_per_s x duration_s is too large".into());
        }
        let plain = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        };
        for name in self
            .cardinality
            .keys()
            .chain(self.mix.iter().map(|kind| &kind.event_type))
        {
            if !plain(name) {
                return Err(format!("{name:?}: type and dim names are [a-z0-9_.-]+"));
            }
        }
        for kind in &self.mix {
            let mut dims = kind.dims.clone();
            dims.sort();
            dims.dedup();
            if dims.len() != kind.dims.len() {
                return Err(format!("{}: a dim is listed twice", kind.event_type));
            }
        }
        if let Some(enrichment) = &self.enrichment {
            for dim in std::iter::once(&enrichment.key).chain(&enrichment.adds) {
                if self.cardinality.get(dim).is_none_or(|n| *n == 0) {
                    return Err(format!("enrichment dim {dim} has no cardinality"));
                }
            }
            for kind in &self.mix {
                if let Some(dim) = enrichment.adds.iter().find(|add| kind.dims.contains(add)) {
                    return Err(format!(
                        "{}: {dim} is added by the enrichment, not sent",
                        kind.event_type
                    ));
                }
            }
        }
        if self.mix.is_empty() || self.mix.iter().all(|kind| kind.weight == 0) {
            return Err("the mix needs at least one type with a weight".into());
        }
        for kind in &self.mix {
            for dim in &kind.dims {
                match self.cardinality.get(dim) {
                    Some(n) if *n > 0 => {}
                    _ => {
                        return Err(format!(
                            "dim {dim} of {} has no cardinality",
                            kind.event_type
                        ))
                    }
                }
            }
            for range in [kind.amount, kind.value].into_iter().flatten() {
                if range[0] > range[1] || range[0] < 0 {
                    return Err(format!(
                        "{}: a range must be [low, high] with 0 <= low <= high",
                        kind.event_type
                    ));
                }
            }
        }
        Ok(())
    }

    /// Dims in a fixed order, so that an event can name one by index.
    pub fn dim_names(&self) -> Vec<String> {
        self.cardinality.keys().cloned().collect()
    }

    pub fn tenant_id(tenant: usize) -> String {
        format!("load{tenant}")
    }

    pub fn tenant_key(tenant: usize) -> String {
        format!("load-key-{tenant}")
    }
}

/// SplitMix64: small, fast, and the same on every platform and version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high]`.
    pub fn between(&mut self, low: i64, high: i64) -> i64 {
        let span = (high - low) as u64 + 1;
        low + (self.next_u64() % span) as i64
    }
}

/// One generated event. Dims are `(index into dim_names, value index)`.
#[derive(Debug, Clone)]
pub struct Event {
    pub serial: u64,
    pub kind: usize,
    pub ts_ms: i64,
    pub amount: Option<i64>,
    pub value: Option<i64>,
    /// The event's dims; the last `added` of them are the enrichment's.
    pub dims: Vec<(usize, u32)>,
    pub added: usize,
}

/// A batch for one tenant. Ids are `{stream}-{serial}`: unique in the run.
#[derive(Debug, Clone)]
pub struct Batch {
    pub tenant: usize,
    pub stream: usize,
    pub events: Vec<Event>,
}

/// The events of one connection: its own PRNG, so connections do not
/// contend and a seed still fixes each connection's events.
pub struct EventStream {
    stream: usize,
    rng: Rng,
    serial: u64,
    batches: u64,
    weights_total: u64,
    kind_dims: Vec<Vec<(usize, u32)>>,
    /// The enrichment's key dim and its added dims with their cardinalities.
    enrichment: Option<(usize, Vec<(usize, u32)>)>,
}

impl EventStream {
    pub fn new(scenario: &Scenario, stream: usize) -> EventStream {
        let names = scenario.dim_names();
        let kind_dims = scenario
            .mix
            .iter()
            .map(|kind| {
                kind.dims
                    .iter()
                    .map(|dim| {
                        // check() made sure every dim has a cardinality
                        let index = names.iter().position(|name| name == dim).unwrap_or(0);
                        (index, scenario.cardinality.get(dim).copied().unwrap_or(1))
                    })
                    .collect()
            })
            .collect();
        let position = |dim: &String| names.iter().position(|name| name == dim).unwrap_or(0);
        let enrichment = scenario.enrichment.as_ref().map(|enrichment| {
            let adds = enrichment
                .adds
                .iter()
                .map(|add| {
                    // check() made sure every added dim has a cardinality
                    let cardinality = scenario.cardinality.get(add).copied().unwrap_or(1);
                    (position(add), cardinality)
                })
                .collect();
            (position(&enrichment.key), adds)
        });
        EventStream {
            stream,
            rng: Rng::new(scenario.seed ^ (stream as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)),
            serial: 0,
            batches: 0,
            weights_total: scenario.mix.iter().map(|kind| kind.weight as u64).sum(),
            kind_dims,
            enrichment,
        }
    }

    /// The next batch, stamped `ts_ms`. Streams take tenants in turn, offset
    /// by their number, so every tenant gets load from every connection.
    pub fn next_batch(&mut self, scenario: &Scenario, ts_ms: i64) -> Batch {
        let tenant = (self.stream + self.batches as usize) % scenario.tenants;
        self.batches += 1;
        let mut events = Vec::with_capacity(scenario.batch_events);
        for _ in 0..scenario.batch_events {
            let mut pick = self.rng.next_u64() % self.weights_total;
            let mut kind = 0;
            for (index, candidate) in scenario.mix.iter().enumerate() {
                if pick < candidate.weight as u64 {
                    kind = index;
                    break;
                }
                pick -= candidate.weight as u64;
            }
            let spec = &scenario.mix[kind];
            let amount = spec.amount.map(|[low, high]| self.rng.between(low, high));
            let value = spec.value.map(|[low, high]| self.rng.between(low, high));
            let mut dims: Vec<(usize, u32)> = self.kind_dims[kind]
                .iter()
                .map(|(dim, cardinality)| {
                    (*dim, (self.rng.next_u64() % *cardinality as u64) as u32)
                })
                .collect();
            let mut added = 0;
            if let Some((key, adds)) = &self.enrichment {
                if let Some(&(_, k)) = dims.iter().find(|(dim, _)| dim == key) {
                    for (add, cardinality) in adds {
                        dims.push((*add, k % cardinality));
                        added += 1;
                    }
                }
            }
            self.serial += 1;
            events.push(Event {
                serial: self.serial,
                kind,
                ts_ms,
                amount,
                value,
                dims,
                added,
            });
        }
        Batch {
            tenant,
            stream: self.stream,
            events,
        }
    }
}

/// Count, amount and value of the events of one type (in one series).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub count: u64,
    pub amount: i128,
    pub value: i128,
}

impl Totals {
    fn merge(&mut self, other: &Totals) {
        self.count += other.count;
        self.amount += other.amount;
        self.value += other.value;
    }

    fn add(&mut self, event: &Event) {
        self.count += 1;
        self.amount += event.amount.unwrap_or(0) as i128;
        self.value += event.value.unwrap_or(0) as i128;
    }
}

/// `(event kind, dim index, value index)`; `None` = the event lacks the dim.
pub type DimKey = (usize, usize, Option<u32>);

/// What every acknowledged event adds, per tenant and type, and per tenant,
/// type, dim and value (`None` = the event does not carry the dim).
pub struct Model {
    pub by_type: Vec<Vec<Totals>>,
    pub by_dim: Vec<BTreeMap<DimKey, Totals>>,
    /// Events per tenant, event second and kind: to say which seconds differ
    /// when a check fails.
    pub by_second: Vec<BTreeMap<(i64, usize), u64>>,
    dim_count: usize,
}

impl Model {
    pub fn new(scenario: &Scenario) -> Model {
        Model {
            by_type: vec![vec![Totals::default(); scenario.mix.len()]; scenario.tenants],
            by_dim: vec![BTreeMap::new(); scenario.tenants],
            by_second: vec![BTreeMap::new(); scenario.tenants],
            dim_count: scenario.cardinality.len(),
        }
    }

    /// Adds what `other` (a model of the same scenario) holds.
    pub fn merge(&mut self, other: &Model) {
        for (tenant, types) in other.by_type.iter().enumerate() {
            for (kind, totals) in types.iter().enumerate() {
                self.by_type[tenant][kind].merge(totals);
            }
        }
        for (tenant, dims) in other.by_dim.iter().enumerate() {
            for (key, totals) in dims {
                self.by_dim[tenant].entry(*key).or_default().merge(totals);
            }
        }
        for (tenant, seconds) in other.by_second.iter().enumerate() {
            for (key, events) in seconds {
                *self.by_second[tenant].entry(*key).or_default() += events;
            }
        }
    }

    pub fn add(&mut self, batch: &Batch) {
        for event in &batch.events {
            self.by_type[batch.tenant][event.kind].add(event);
            *self.by_second[batch.tenant]
                .entry((event.ts_ms.div_euclid(1000), event.kind))
                .or_default() += 1;
            for dim in 0..self.dim_count {
                let value = event.dims.iter().find(|(d, _)| *d == dim).map(|(_, v)| *v);
                self.by_dim[batch.tenant]
                    .entry((event.kind, dim, value))
                    .or_default()
                    .add(event);
            }
        }
    }

    /// The figures each value of `dim` must show in a breakdown of the metric
    /// `expectation` describes, for one tenant: by the value as sent
    /// (`{dim}-{n}`), and `__none__` for events without the dim. Values no
    /// event reached are left out.
    pub fn breakdown(
        &self,
        scenario: &Scenario,
        tenant: usize,
        dim: &str,
        expectation: &Expectation,
    ) -> Vec<(String, Vec<(&'static str, i128)>)> {
        let dim_names = scenario.dim_names();
        let dim_index = dim_names.iter().position(|name| name == dim);
        let mut labels: Vec<Option<u32>> = vec![None];
        if let Some(index) = dim_index {
            labels.extend((0..scenario.cardinality[&dim_names[index]]).map(Some));
        }
        let mut out = Vec::new();
        for label in labels {
            let figures = expectation.figures(|kind| match dim_index {
                Some(index) => self.by_dim[tenant]
                    .get(&(kind, index, label))
                    .copied()
                    .unwrap_or_default(),
                // the scenario never sends this dim: every event is `__none__`
                None if label.is_none() => self.by_type[tenant][kind],
                None => Totals::default(),
            });
            if figures.iter().all(|(_, value)| *value == 0) {
                continue;
            }
            let name = match label {
                Some(value) => format!("{dim}-{value}"),
                None => "__none__".to_string(),
            };
            out.push((name, figures));
        }
        out
    }

    pub fn events(&self) -> u64 {
        self.by_type
            .iter()
            .flatten()
            .map(|totals| totals.count)
            .sum()
    }
}

/// What one metric of the catalogue reads from events, in terms of the mix.
#[derive(Debug, Clone)]
pub enum Expectation {
    /// `value` = sum of amount (or value), `count` = events.
    Sum {
        kinds: Vec<usize>,
        of_value: bool,
    },
    Count {
        kinds: Vec<usize>,
    },
    Ratio {
        numerator: Vec<usize>,
        denominator: Vec<usize>,
    },
    Histogram {
        kinds: Vec<usize>,
    },
}

/// Catalogue metrics with their expectation; mean metrics are derived and
/// left out.
pub fn expectations(
    metrics: &[MetricConfig],
    scenario: &Scenario,
) -> Vec<(MetricConfig, Expectation)> {
    let kinds_of = |types: &[String]| -> Vec<usize> {
        scenario
            .mix
            .iter()
            .enumerate()
            .filter(|(_, kind)| types.contains(&kind.event_type))
            .map(|(index, _)| index)
            .collect()
    };
    let mut out = Vec::new();
    for metric in metrics {
        let expectation = match metric.kind {
            MetricKindName::Sum => Expectation::Sum {
                kinds: kinds_of(&metric.types),
                of_value: metric.field.as_deref() == Some("value"),
            },
            MetricKindName::Count => Expectation::Count {
                kinds: kinds_of(&metric.types),
            },
            MetricKindName::Ratio => Expectation::Ratio {
                numerator: kinds_of(&metric.numerator),
                denominator: kinds_of(&metric.denominator),
            },
            MetricKindName::Histogram => Expectation::Histogram {
                kinds: kinds_of(&metric.types),
            },
            // a mean is derived from two other metrics, checked themselves
            MetricKindName::Mean => continue,
        };
        out.push((metric.clone(), expectation));
    }
    out
}

impl Expectation {
    /// The event kinds that feed the metric at all.
    pub fn kinds(&self) -> Vec<usize> {
        match self {
            Expectation::Sum { kinds, .. }
            | Expectation::Count { kinds }
            | Expectation::Histogram { kinds } => kinds.clone(),
            Expectation::Ratio {
                numerator,
                denominator,
            } => {
                let mut all = denominator.clone();
                for kind in numerator {
                    if !all.contains(kind) {
                        all.push(*kind);
                    }
                }
                all
            }
        }
    }

    /// The figures a target must report, named as in Tally's window JSON, for
    /// events whose totals per kind `totals_of` gives.
    pub fn figures(&self, totals_of: impl Fn(usize) -> Totals) -> Vec<(&'static str, i128)> {
        let sum = |kinds: &[usize], pick: &dyn Fn(Totals) -> i128| -> i128 {
            kinds.iter().map(|kind| pick(totals_of(*kind))).sum()
        };
        match self {
            Expectation::Sum { kinds, of_value } => vec![
                (
                    "value",
                    sum(kinds, &|t| if *of_value { t.value } else { t.amount }),
                ),
                ("count", sum(kinds, &|t| t.count as i128)),
            ],
            Expectation::Count { kinds } => vec![("value", sum(kinds, &|t| t.count as i128))],
            Expectation::Ratio {
                numerator,
                denominator,
            } => vec![
                ("numerator", sum(numerator, &|t| t.count as i128)),
                ("denominator", sum(denominator, &|t| t.count as i128)),
            ],
            Expectation::Histogram { kinds } => vec![("count", sum(kinds, &|t| t.count as i128))],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        toml::from_str(
            r#"
seed = 7
tenants = 2
duration_s = 1
rate_events_per_s = 0
batch_events = 50
connections = 1
[cardinality]
device = 3
[[mix]]
type = "order.completed"
weight = 3
amount = [100, 200]
dims = ["device"]
[[mix]]
type = "search.query"
weight = 1
"#,
        )
        .unwrap()
    }

    /// Makes a good scenario bad in one way.
    type Spoil = &'static dyn Fn(&mut Scenario);

    #[test]
    fn bad_scenarios_are_refused_with_what_is_wrong() {
        let cases: [(&str, Spoil, &str); 8] = [
            ("no tenants", &|s| s.tenants = 0, "must be at least 1"),
            (
                "no duration",
                &|s| s.duration_s = 0,
                "duration_s must be 1 to 840",
            ),
            (
                "too long for 15m",
                &|s| s.duration_s = 841,
                "duration_s must be 1 to 840",
            ),
            (
                "rate overflow",
                &|s| {
                    s.rate_events_per_s = u64::MAX;
                    s.duration_s = 2;
                },
                "too large",
            ),
            (
                "no weights",
                &|s| s.mix.iter_mut().for_each(|k| k.weight = 0),
                "needs at least one type",
            ),
            (
                "dim twice",
                &|s| s.mix[0].dims.push("device".into()),
                "listed twice",
            ),
            (
                "unknown dim",
                &|s| s.mix[1].dims.push("sku".into()),
                "dim sku of search.query has no cardinality",
            ),
            (
                "bad range",
                &|s| s.mix[0].amount = Some([5, 1]),
                "a range must be",
            ),
        ];
        assert!(scenario().check().is_ok());
        for (case, spoil, message) in cases {
            let mut bad = scenario();
            spoil(&mut bad);
            let error = bad.check().expect_err(case);
            assert!(error.contains(message), "{case}: {error}");
        }
        let mut quoted = scenario();
        quoted.mix[1].event_type = "search\"query".into();
        assert!(quoted.check().unwrap_err().contains("type and dim names"));
    }

    #[test]
    fn a_breakdown_names_each_value_sent_and_none_for_the_rest() {
        let scenario = scenario();
        let mut stream = EventStream::new(&scenario, 0);
        let mut model = Model::new(&scenario);
        let batch = stream.next_batch(&scenario, 0);
        model.add(&batch);
        // orders broken down by device: every order has a device
        let orders = Expectation::Count { kinds: vec![0] };
        let by_device = model.breakdown(&scenario, 0, "device", &orders);
        let mut want: BTreeMap<String, i128> = BTreeMap::new();
        for event in batch.events.iter().filter(|e| e.kind == 0) {
            *want
                .entry(format!("device-{}", event.dims[0].1))
                .or_default() += 1;
        }
        let got: BTreeMap<String, i128> =
            by_device.iter().map(|(n, f)| (n.clone(), f[0].1)).collect();
        assert_eq!(got, want);
        // searches carry no device: all of them are `__none__`
        let searches = Expectation::Count { kinds: vec![1] };
        let none = model.breakdown(&scenario, 0, "device", &searches);
        assert_eq!(
            none,
            vec![(
                "__none__".to_string(),
                vec![("value", model.by_type[0][1].count as i128)]
            )]
        );
        // a dim the scenario never sends: everything is `__none__`
        let never = model.breakdown(&scenario, 0, "country", &orders);
        assert_eq!(
            never,
            vec![(
                "__none__".to_string(),
                vec![("value", model.by_type[0][0].count as i128)]
            )]
        );
    }

    #[test]
    fn a_seed_gives_the_same_events() {
        let scenario = scenario();
        let a = EventStream::new(&scenario, 0).next_batch(&scenario, 0);
        let b = EventStream::new(&scenario, 0).next_batch(&scenario, 0);
        let render = |batch: &Batch| format!("{:?}", batch.events);
        assert_eq!(render(&a), render(&b));
        let c = EventStream::new(&scenario, 1).next_batch(&scenario, 0);
        assert_ne!(render(&a), render(&c));
    }

    #[test]
    fn the_model_counts_every_event_by_type_and_dim() {
        let scenario = scenario();
        let mut stream = EventStream::new(&scenario, 0);
        let mut model = Model::new(&scenario);
        let batch = stream.next_batch(&scenario, 0);
        model.add(&batch);
        let orders: Vec<&Event> = batch.events.iter().filter(|e| e.kind == 0).collect();
        assert_eq!(model.by_type[0][0].count, orders.len() as u64);
        assert_eq!(
            model.by_type[0][0].amount,
            orders
                .iter()
                .map(|e| e.amount.unwrap() as i128)
                .sum::<i128>()
        );
        assert_eq!(model.by_type[0][1].count, 50 - orders.len() as u64);
        let by_device: u64 = (0..3)
            .map(|v| model.by_dim[0].get(&(0, 0, Some(v))).map_or(0, |t| t.count))
            .sum();
        assert_eq!(by_device, orders.len() as u64);
        assert_eq!(
            model.by_dim[0].get(&(1, 0, None)).map_or(0, |t| t.count),
            50 - orders.len() as u64
        );
        assert_eq!(model.events(), 50);
    }
}
