//! Experiments as API.md §8 states them: their check, every problem named by
//! field, and their state machine (`running → paused | stopped`, `paused →
//! running` on resume).
//! Owns: what an experiment and its guardrails say, which transitions are
//! allowed, and one look at an experiment: which guardrail breaches for
//! which variant, given its counts (`judge_guardrail`, `judge_sample_ratio`).
//! Must not: count events, do the statistics (`guardrail` does) or store
//! anything.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::catalogue::{Catalogue, MetricKind};
use super::guardrail::{
    normal_upper_tail, sample_ratio, sequential, sequential_p95, srm_look, z_test, Compare,
    Proportion, SequentialState, Verdict, P95_TAIL, SRM_ALPHA, SRM_LOOKS_MAX,
};
use super::metric::Watched;

/// Variants an experiment may have.
pub const VARIANTS_MAX: usize = 16;
/// Guardrails an experiment may have.
pub const GUARDRAILS_MAX: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The mixture sequential test: valid however often it is looked at.
    #[default]
    Sequential,
    /// The fixed-horizon two-proportion z-test (for comparison).
    Z,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareKind {
    Ratio,
    Delta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Pause,
    Stop,
}

/// One guardrail as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailSpec {
    pub metric: String,
    /// Only on histogram metrics: `p95`.
    #[serde(default)]
    pub stat: Option<String>,
    pub compare: CompareKind,
    /// In the metric's unit: a rate difference (0.01 = 1 point), a ratio, or
    /// milliseconds of p95 for `stat = "p95"`.
    pub threshold: f64,
    pub action: Action,
}

/// An experiment as `PUT /v1/experiments/{id}` takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    pub variants: Vec<String>,
    pub control: String,
    pub split: BTreeMap<String, f64>,
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub guardrails: Vec<GuardrailSpec>,
}

fn default_min_samples() -> u64 {
    1_000
}

fn default_confidence() -> f64 {
    0.95
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl ExperimentSpec {
    /// Every problem, by field (`split.B`, `guardrails[1].stat`, …); empty
    /// when it checks.
    pub fn problems(&self, catalogue: &Catalogue) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem =
            |field: String, message: &str| problems.push((field, message.to_string()));
        if self.variants.len() < 2 || self.variants.len() > VARIANTS_MAX {
            problem("variants".into(), "must name 2 to 16 variants");
        }
        for (index, variant) in self.variants.iter().enumerate() {
            if !is_name(variant) {
                problem(
                    format!("variants[{index}]"),
                    "must match [A-Za-z0-9_.-]{1,64}",
                );
            } else if self.variants[..index].contains(variant) {
                problem(format!("variants[{index}]"), "is named twice");
            }
        }
        if !self.variants.contains(&self.control) {
            problem("control".into(), "must be one of the variants");
        }
        for variant in &self.variants {
            if !self.split.contains_key(variant) {
                problem(format!("split.{variant}"), "every variant needs its share");
            }
        }
        for (variant, share) in &self.split {
            if !self.variants.contains(variant) {
                problem(format!("split.{variant}"), "is not a variant");
            } else if !(share.is_finite() && *share > 0.0 && *share <= 1.0) {
                problem(format!("split.{variant}"), "must be above 0 and at most 1");
            }
        }
        let total: f64 = self.split.values().sum();
        if (total - 1.0).abs() > 1e-9 {
            problem("split".into(), "the shares must sum to 1");
        }
        if self.min_samples == 0 {
            problem("min_samples".into(), "must be at least 1");
        }
        if !(self.confidence > 0.5 && self.confidence < 1.0) {
            problem("confidence".into(), "must be above 0.5 and below 1");
        }
        if self.guardrails.is_empty() {
            problem(
                "guardrails".into(),
                "at least one guardrail: its metrics are what the experiment counts",
            );
        } else if self.guardrails.len() > GUARDRAILS_MAX {
            problem("guardrails".into(), "at most 16 guardrails");
        }
        for (index, guardrail) in self.guardrails.iter().enumerate() {
            let at = format!("guardrails[{index}]");
            let kind = catalogue
                .index_of(&guardrail.metric)
                .map(|metric| &catalogue.metrics()[metric].kind);
            match (kind, guardrail.stat.as_deref()) {
                (None, _) => problem(format!("{at}.metric"), "unknown metric"),
                (Some(MetricKind::Histogram), Some("p95")) => {}
                (Some(MetricKind::Histogram), Some(_)) => {
                    problem(format!("{at}.stat"), "the only stat is p95")
                }
                (Some(MetricKind::Histogram), None) => problem(
                    format!("{at}.stat"),
                    "a histogram guardrail needs stat = \"p95\"",
                ),
                (Some(MetricKind::Ratio), None) => {}
                (Some(_), Some(_)) => {
                    problem(format!("{at}.stat"), "stat is only for histogram metrics")
                }
                (Some(_), None) => problem(
                    format!("{at}.metric"),
                    "a guardrail watches a rate (ratio metric) or a histogram's p95",
                ),
            }
            let threshold_ok = guardrail.threshold.is_finite()
                && match guardrail.compare {
                    CompareKind::Ratio => guardrail.threshold > 1.0,
                    CompareKind::Delta => guardrail.threshold > 0.0,
                };
            if !threshold_ok {
                problem(
                    format!("{at}.threshold"),
                    "must be above 1 for a ratio and above 0 for a delta",
                );
            }
            if guardrail.stat.is_some() && guardrail.compare == CompareKind::Ratio {
                problem(
                    format!("{at}.compare"),
                    "a p95 guardrail compares by delta (ms)",
                );
            }
        }
        problems
    }
}

/// Where an experiment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExperimentState {
    Running,
    Paused,
    Stopped,
}

impl ExperimentState {
    /// The state a breach with `action` moves a running experiment to; none
    /// when it is not running (a paused or stopped experiment signals once).
    pub fn on_breach(self, action: Action) -> Option<ExperimentState> {
        match (self, action) {
            (ExperimentState::Running, Action::Pause) => Some(ExperimentState::Paused),
            (ExperimentState::Running, Action::Stop) => Some(ExperimentState::Stopped),
            _ => None,
        }
    }

    /// Resume: a paused experiment runs again; a stopped one stays stopped.
    pub fn on_resume(self) -> Result<ExperimentState, &'static str> {
        match self {
            ExperimentState::Paused | ExperimentState::Running => Ok(ExperimentState::Running),
            ExperimentState::Stopped => {
                Err("a stopped experiment does not resume; register a new one")
            }
        }
    }
}

impl ExperimentState {
    pub fn name(self) -> &'static str {
        match self {
            ExperimentState::Running => "running",
            ExperimentState::Paused => "paused",
            ExperimentState::Stopped => "stopped",
        }
    }
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Stop => "stop",
        }
    }
}

/// An experiment as the node keeps it (`Space::Experiments`, JSON so that a
/// later field can default): its spec, where it is, and from when it counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredExperiment {
    pub id: String,
    pub spec: ExperimentSpec,
    pub state: ExperimentState,
    /// Batches accepted from here count (stamped by the tenant actor).
    pub started_ms: i64,
    /// From here they count into what the guardrails judge (the start, or
    /// the last resume).
    pub epoch_ms: i64,
    /// Sample-ratio looks taken, and whether a mismatch was signalled.
    #[serde(default)]
    pub srm_looks: u32,
    #[serde(default)]
    pub srm_signalled: bool,
    /// When it was registered or last changed state (ms since the epoch).
    pub changed_ms: i64,
}

impl StoredExperiment {
    /// What the metric actors count for it: every metric a guardrail names.
    pub fn watched(&self, catalogue: &Catalogue) -> Watched {
        let metrics = self
            .spec
            .guardrails
            .iter()
            .filter_map(|guardrail| catalogue.index_of(&guardrail.metric))
            .fold(0u64, |mask, index| mask | (1u64 << index));
        Watched {
            experiment: self.id.clone(),
            variants: self.spec.variants.clone(),
            metrics,
            started_ms: self.started_ms,
            epoch_ms: self.epoch_ms,
        }
    }
}

/// One guardrail's counts at a look, per variant in the experiment's order
/// of variants: since the experiment started or was last resumed.
#[derive(Debug, Clone, Copy)]
pub enum GuardrailCounts<'a> {
    /// Rate metrics: hits (the numerator) of samples (the denominator).
    Rate(&'a [Proportion]),
    /// `p95` of a histogram metric: each variant's histogram, if it has values.
    Latency(&'a [Option<&'a Histogram<u64>>]),
}

/// A guardrail that breached for a variant: the fields of its signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    pub guardrail: usize,
    pub variant: String,
    /// The treatment's rate (or p95, ms) and control's.
    pub observed: Option<f64>,
    pub baseline: Option<f64>,
    pub threshold: f64,
    /// The treatment's samples.
    pub samples: u64,
    pub p_value: f64,
}

/// A one-sided z-test that the share above the line exceeds 5 % (the p95
/// guardrail under `method = "z"`: valid for a single look only).
fn z_test_p95(above: u64, samples: u64, threshold_ms: f64, confidence: f64) -> Verdict {
    if samples == 0 {
        return Verdict {
            worse: false,
            observed: None,
            threshold: threshold_ms,
            p_value: 1.0,
        };
    }
    let n = samples as f64;
    let share = (above as f64 + 0.5) / (n + 1.0);
    let z = (share - P95_TAIL) / (P95_TAIL * (1.0 - P95_TAIL) / n).sqrt();
    let p_value = normal_upper_tail(z).min(1.0);
    let p_value = if z > 0.0 { p_value } else { 1.0 };
    Verdict {
        worse: p_value < 1.0 - confidence,
        observed: Some(share),
        threshold: threshold_ms,
        p_value,
    }
}

/// One look at guardrail `index` of `spec`: the first treatment variant (in
/// the experiment's order) that the evidence says is worse than control by
/// more than the threshold, with `min_samples` in both. `tests` carries each
/// variant's sequential state from look to look (by variant name).
pub fn judge_guardrail(
    spec: &ExperimentSpec,
    index: usize,
    counts: GuardrailCounts<'_>,
    tests: &mut BTreeMap<String, SequentialState>,
) -> Option<Breach> {
    let guardrail = spec.guardrails.get(index)?;
    let control = spec.variants.iter().position(|v| *v == spec.control)?;
    for (variant_index, variant) in spec.variants.iter().enumerate() {
        if variant_index == control {
            continue;
        }
        let state = tests.entry(variant.clone()).or_default();
        let (verdict, samples, observed, baseline) = match counts {
            GuardrailCounts::Rate(proportions) => {
                let (Some(&control_counts), Some(&treatment)) =
                    (proportions.get(control), proportions.get(variant_index))
                else {
                    continue;
                };
                if control_counts.samples < spec.min_samples || treatment.samples < spec.min_samples
                {
                    continue;
                }
                let compare = match guardrail.compare {
                    CompareKind::Delta => Compare::Delta {
                        margin: guardrail.threshold,
                    },
                    CompareKind::Ratio => Compare::Ratio {
                        ratio: guardrail.threshold,
                    },
                };
                let verdict = match spec.method {
                    Method::Sequential => {
                        sequential(control_counts, treatment, compare, spec.confidence, state)
                    }
                    Method::Z => z_test(control_counts, treatment, compare, spec.confidence),
                };
                (
                    verdict,
                    treatment.samples,
                    treatment.rate(),
                    control_counts.rate(),
                )
            }
            GuardrailCounts::Latency(histograms) => {
                let (Some(Some(control_histogram)), Some(Some(treatment))) =
                    (histograms.get(control), histograms.get(variant_index))
                else {
                    continue;
                };
                if control_histogram.len() < spec.min_samples || treatment.len() < spec.min_samples
                {
                    continue;
                }
                let control_p95 = control_histogram.value_at_quantile(1.0 - P95_TAIL);
                // treatment events above control's p95 + the threshold
                let line = control_p95.saturating_add(guardrail.threshold.ceil() as u64);
                let above = treatment.len() - treatment.count_between(0, line);
                let verdict = match spec.method {
                    Method::Sequential => sequential_p95(
                        above,
                        treatment.len(),
                        guardrail.threshold,
                        spec.confidence,
                        state,
                    ),
                    Method::Z => {
                        z_test_p95(above, treatment.len(), guardrail.threshold, spec.confidence)
                    }
                };
                (
                    verdict,
                    treatment.len(),
                    Some(treatment.value_at_quantile(1.0 - P95_TAIL) as f64),
                    Some(control_p95 as f64),
                )
            }
        };
        if verdict.worse {
            return Some(Breach {
                guardrail: index,
                variant: variant.clone(),
                observed,
                baseline,
                threshold: guardrail.threshold,
                samples,
                p_value: verdict.p_value,
            });
        }
    }
    None
}

/// A sample-ratio mismatch found at a look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mismatch {
    pub chi_square: f64,
    pub p_value: f64,
    pub samples: u64,
}

/// The sample-ratio test at the looks the samples reached since `looks_done`
/// (docs/experiments.md: at 1 000 samples and each doubling, Bonferroni over
/// `SRM_LOOKS_MAX` looks). Returns the look reached, and a mismatch if this
/// look finds one. `samples` are per variant in the experiment's order.
pub fn judge_sample_ratio(
    spec: &ExperimentSpec,
    samples: &[u64],
    looks_done: u32,
) -> (u32, Option<Mismatch>) {
    let total: u64 = samples.iter().sum();
    let look = srm_look(total);
    if look <= looks_done {
        return (looks_done, None);
    }
    let split: Vec<f64> = spec
        .variants
        .iter()
        .map(|variant| spec.split.get(variant).copied().unwrap_or(0.0))
        .collect();
    let mismatch = sample_ratio(samples, &split).and_then(|(chi_square, p_value)| {
        (p_value < SRM_ALPHA / SRM_LOOKS_MAX as f64).then_some(Mismatch {
            chi_square,
            p_value,
            samples: total,
        })
    });
    (look, mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    fn catalogue() -> Catalogue {
        let config =
            crate::config::Config::parse(include_str!("../../config/default.toml"), Vec::new())
                .unwrap();
        config.catalogue().unwrap()
    }

    fn contract_example() -> ExperimentSpec {
        serde_json::from_str(
            r#"{"variants": ["A", "B"], "control": "A", "split": {"A": 0.5, "B": 0.5},
                "min_samples": 1000, "confidence": 0.95, "method": "sequential",
                "guardrails": [
                  {"metric": "error_rate", "compare": "ratio", "threshold": 2.0, "action": "stop"},
                  {"metric": "payment_failure_rate", "compare": "delta", "threshold": 0.01, "action": "pause"},
                  {"metric": "checkout_latency_ms", "stat": "p95", "compare": "delta", "threshold": 200, "action": "stop"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn the_contracts_example_checks() {
        assert_eq!(contract_example().problems(&catalogue()), vec![]);
    }

    #[test]
    fn every_problem_names_its_field() {
        let mut spec = contract_example();
        spec.variants = vec!["A".into(), "B".into(), "B".into()];
        spec.control = "C".into();
        spec.split.insert("B".into(), 0.6);
        spec.confidence = 1.0;
        spec.guardrails[0].metric = "gmv".into();
        spec.guardrails[1].stat = Some("p95".into());
        spec.guardrails[2].stat = Some("p99".into());
        spec.guardrails[2].threshold = -1.0;
        let fields: Vec<String> = spec
            .problems(&catalogue())
            .into_iter()
            .map(|(field, _)| field)
            .collect();
        assert_eq!(
            fields,
            [
                "variants[2]",
                "control",
                "split",
                "confidence",
                "guardrails[0].metric",
                "guardrails[1].stat",
                "guardrails[2].stat",
                "guardrails[2].threshold",
            ]
        );
    }

    fn one_guardrail(json: &str, method: Method, min_samples: u64) -> ExperimentSpec {
        let mut spec = contract_example();
        spec.guardrails = vec![serde_json::from_str(json).unwrap()];
        spec.method = method;
        spec.min_samples = min_samples;
        spec
    }

    #[test]
    fn a_rate_guardrail_breaches_for_the_worse_treatment_once_both_have_min_samples() {
        let spec = one_guardrail(
            r#"{"metric": "error_rate", "compare": "ratio", "threshold": 2.0, "action": "stop"}"#,
            Method::Sequential,
            1_000,
        );
        let control = Proportion {
            samples: 1_000,
            hits: 20,
        };
        let worse = Proportion {
            samples: 1_000,
            hits: 100,
        };
        let mut tests = BTreeMap::new();
        let breach = judge_guardrail(
            &spec,
            0,
            GuardrailCounts::Rate(&[control, worse]),
            &mut tests,
        )
        .expect("10 % against 2 % with a ratio of 2");
        assert_eq!(breach.variant, "B");
        assert_eq!((breach.observed, breach.baseline), (Some(0.1), Some(0.02)));
        assert_eq!((breach.threshold, breach.samples), (2.0, 1_000));
        assert!(breach.p_value < 0.05, "{}", breach.p_value);
        // fewer than min_samples in control: no judgement
        let few = Proportion {
            samples: 999,
            hits: 20,
        };
        let mut tests = BTreeMap::new();
        assert_eq!(
            judge_guardrail(&spec, 0, GuardrailCounts::Rate(&[few, worse]), &mut tests),
            None
        );
        // the same rate: nothing
        assert_eq!(
            judge_guardrail(
                &spec,
                0,
                GuardrailCounts::Rate(&[control, control]),
                &mut tests
            ),
            None
        );
        // an improvement never stops
        let better = Proportion {
            samples: 1_000,
            hits: 0,
        };
        assert_eq!(
            judge_guardrail(
                &spec,
                0,
                GuardrailCounts::Rate(&[worse, better]),
                &mut tests
            ),
            None
        );
    }

    #[test]
    fn a_p95_guardrail_breaches_when_the_treatment_is_slower_than_control_by_more_than_the_threshold(
    ) {
        let spec = one_guardrail(
            r#"{"metric": "checkout_latency_ms", "stat": "p95", "compare": "delta", "threshold": 200, "action": "stop"}"#,
            Method::Sequential,
            1_000,
        );
        let mut control = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).unwrap();
        let mut slower = control.clone();
        let mut within = control.clone();
        for n in 0..2_000u64 {
            let ms = 100 + n % 500; // p95 about 575 ms
            control.record(ms).unwrap();
            slower.record(ms + 400).unwrap();
            within.record(ms + 100).unwrap();
        }
        let mut tests = BTreeMap::new();
        let breach = judge_guardrail(
            &spec,
            0,
            GuardrailCounts::Latency(&[Some(&control), Some(&slower)]),
            &mut tests,
        )
        .expect("400 ms slower against a 200 ms threshold");
        assert_eq!(breach.variant, "B");
        assert_eq!(
            breach.baseline,
            Some(control.value_at_quantile(0.95) as f64)
        );
        assert_eq!(breach.observed, Some(slower.value_at_quantile(0.95) as f64));
        let mut tests = BTreeMap::new();
        assert_eq!(
            judge_guardrail(
                &spec,
                0,
                GuardrailCounts::Latency(&[Some(&control), Some(&within)]),
                &mut tests
            ),
            None
        );
        assert_eq!(
            judge_guardrail(
                &spec,
                0,
                GuardrailCounts::Latency(&[Some(&control), None]),
                &mut tests
            ),
            None
        );
    }

    #[test]
    fn the_sample_ratio_is_judged_once_a_look_and_flags_52_48() {
        let spec = contract_example();
        let (looks, mismatch) = judge_sample_ratio(&spec, &[52_000, 48_000], 0);
        assert_eq!(looks, 7);
        let mismatch = mismatch.expect("52/48 of 100 000");
        assert_eq!(mismatch.samples, 100_000);
        assert!(
            (mismatch.chi_square - 160.0).abs() < 1e-6,
            "{}",
            mismatch.chi_square
        );
        assert_eq!(judge_sample_ratio(&spec, &[50_100, 49_900], 0), (7, None));
        // no new look, no judgement
        assert_eq!(judge_sample_ratio(&spec, &[52_000, 48_000], 7), (7, None));
        assert_eq!(judge_sample_ratio(&spec, &[400, 100], 0), (0, None));
    }

    /// A/A experiments judged after every batch through `judge_guardrail`,
    /// as the node's tick does: the share stopped by each method.
    fn a_a_share(method: Method, runs: u64) -> f64 {
        use super::super::guardrail::tests::Rng;
        let spec = one_guardrail(
            r#"{"metric": "error_rate", "compare": "ratio", "threshold": 1.0001, "action": "stop"}"#,
            method,
            200,
        );
        let mut stopped = 0;
        for seed in 0..runs {
            let mut rng = Rng(seed * 6_151 + 3);
            let mut counts = [Proportion::default(); 2];
            let mut tests = BTreeMap::new();
            for _ in 0..50 {
                for variant in &mut counts {
                    variant.samples += 200;
                    variant.hits += rng.hits(200, 0.02);
                }
                if judge_guardrail(&spec, 0, GuardrailCounts::Rate(&counts), &mut tests).is_some() {
                    stopped += 1;
                    break;
                }
            }
        }
        stopped as f64 / runs as f64
    }

    #[test]
    fn a_thousand_a_a_experiments_judged_as_the_node_does_stop_at_most_5_percent() {
        let sequential_share = a_a_share(Method::Sequential, 1_000);
        let z_share = a_a_share(Method::Z, 1_000);
        println!("A/A through judge_guardrail: sequential {sequential_share}, z {z_share}");
        assert!(sequential_share <= 0.05, "{sequential_share}");
        assert!(z_share > sequential_share, "{z_share}");
    }

    /// The larger run (docs/experiments.md):
    /// `cargo test --release --lib -- --ignored ten_thousand`.
    #[test]
    #[ignore]
    fn ten_thousand_a_a_experiments_judged_as_the_node_does() {
        let sequential_share = a_a_share(Method::Sequential, 10_000);
        let z_share = a_a_share(Method::Z, 10_000);
        println!(
            "A/A, 10 000 runs through judge_guardrail: sequential {sequential_share}, z {z_share}"
        );
        assert!(sequential_share <= 0.05, "{sequential_share}");
    }

    #[test]
    fn a_breach_pauses_or_stops_once_and_only_a_paused_experiment_resumes() {
        use ExperimentState::*;
        assert_eq!(Running.on_breach(Action::Pause), Some(Paused));
        assert_eq!(Running.on_breach(Action::Stop), Some(Stopped));
        assert_eq!(Paused.on_breach(Action::Stop), None);
        assert_eq!(Stopped.on_breach(Action::Pause), None);
        assert_eq!(Paused.on_resume(), Ok(Running));
        assert!(Stopped.on_resume().is_err());
    }
}
