//! Alert rules and the state of each alert (API.md §7, docs/alerts.md).
//!
//! Owns: what a rule says and how it is checked, how one observation of a
//! window moves an alert through `ok → pending → firing → resolved`, and the
//! record each transition makes. Evaluated on a tick, with `now` given.
//! Must not: read windows, storage or the clock (the alert engine hands it
//! observations and writes its records), or decide sequence numbers.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::time::WindowName;

/// Share of a threshold a value must come back past before a firing alert
/// resolves, so that a value hovering at the threshold does not flap.
pub const RESOLVE_HYSTERESIS: f64 = 0.1;
/// Past windows a `zscore` rule may keep.
pub const ZSCORE_HISTORY_MAX: usize = 2_880;
/// The fewest past windows a `zscore` baseline is computed from.
pub const ZSCORE_HISTORY_MIN: usize = 4;

/// A rule's condition (API.md §7). Percentages are percent (30 = 30 %).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    Above {
        value: f64,
    },
    Below {
        value: f64,
    },
    DropVsPrev {
        pct: f64,
    },
    RiseVsPrev {
        pct: f64,
    },
    Zscore {
        threshold: f64,
        history: usize,
    },
    /// No event of the metric's types for the rule's `for_s`.
    Absent {},
    /// The window's value against a budget per dim value (or one for the rule).
    BudgetUsed {
        pct: f64,
    },
}

impl Condition {
    pub fn name(&self) -> &'static str {
        match self {
            Condition::Above { .. } => "above",
            Condition::Below { .. } => "below",
            Condition::DropVsPrev { .. } => "drop_vs_prev",
            Condition::RiseVsPrev { .. } => "rise_vs_prev",
            Condition::Zscore { .. } => "zscore",
            Condition::Absent {} => "absent",
            Condition::BudgetUsed { .. } => "budget_used",
        }
    }

    /// What is wrong with it, if anything: (field, message).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let finite = |name: &'static str, value: f64| {
            (!value.is_finite()).then(|| (name, "must be a finite number".to_string()))
        };
        match self {
            Condition::Above { value } | Condition::Below { value } => {
                finite("condition.value", *value)
            }
            Condition::DropVsPrev { pct } | Condition::RiseVsPrev { pct } => {
                finite("condition.pct", *pct).or_else(|| {
                    (*pct <= 0.0 || *pct > 100.0 && matches!(self, Condition::DropVsPrev { .. }))
                        .then(|| {
                            (
                                "condition.pct",
                                "must be above 0 (at most 100 for a drop)".into(),
                            )
                        })
                })
            }
            Condition::Zscore { threshold, history } => finite("condition.threshold", *threshold)
                .or_else(|| {
                    (*threshold <= 0.0)
                        .then(|| ("condition.threshold", "must be above 0".to_string()))
                })
                .or_else(|| {
                    (!(ZSCORE_HISTORY_MIN..=ZSCORE_HISTORY_MAX).contains(history)).then(|| {
                        (
                            "condition.history",
                            format!("must be {ZSCORE_HISTORY_MIN} to {ZSCORE_HISTORY_MAX} windows"),
                        )
                    })
                }),
            Condition::Absent {} => None,
            Condition::BudgetUsed { pct } => finite("condition.pct", *pct).or_else(|| {
                (*pct <= 0.0).then(|| ("condition.pct", "must be above 0".to_string()))
            }),
        }
    }
}

/// An alert rule: from config (`[[alerts]]`) or `PUT /v1/alerts/{rule_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub metric: String,
    pub window: WindowName,
    pub condition: Condition,
    /// One alert per value of this dim.
    pub by: Option<String>,
    /// Events the window (for drops and rises: the window before) must hold
    /// before the rule judges it.
    pub min_count: u64,
    /// How long a breach must hold before it fires; for `absent`, how long
    /// the silence must be.
    pub for_s: i64,
    pub severity: String,
    pub runbook: Option<String>,
}

/// One window of one alert (the rule's metric, or one dim value of it) at a
/// tick, as the read path shows it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observation {
    pub value: Option<f64>,
    pub prev: Option<f64>,
    pub events: u64,
    pub prev_events: u64,
    /// Events in the last 30 seconds (`absent` watches these).
    pub recent_events: u64,
}

/// Where an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AlertState {
    Ok,
    Pending { since_ms: i64 },
    Firing { since_ms: i64 },
}

/// The transition a record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// A breach began; it fires once it has held `for_s`.
    Pending,
    Firing,
    /// A firing alert is over.
    Resolved,
    /// A pending breach ended before it fired.
    Ok,
}

/// What a transition reports: the observed value, the baseline it was judged
/// against and the threshold, in the metric's unit where the condition has
/// one (for `zscore`, `value` is the z-score and `threshold` its bound).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub breached: bool,
    /// Past the resolve hysteresis: a firing alert may resolve.
    pub cleared: bool,
    pub value: Option<f64>,
    pub baseline: Option<f64>,
    pub threshold: Option<f64>,
}

impl Judgement {
    /// Nothing judged: no breach, no value.
    pub fn quiet() -> Judgement {
        Judgement {
            breached: false,
            cleared: false,
            value: None,
            baseline: None,
            threshold: None,
        }
    }
}

/// One alert's memory between ticks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertMemory {
    pub state: AlertState,
    /// When an event was last seen (`absent`), or first watched.
    pub last_seen_ms: i64,
    /// Completed windows' values, oldest first (`zscore`).
    pub history: VecDeque<f64>,
    /// The window period the newest history value closed (`zscore`).
    pub history_period: Option<i64>,
    /// The history's mean and deviation, worked out once each time it
    /// changes (once a period), not at every tick.
    #[serde(skip)]
    pub history_stats: Option<(f64, f64)>,
}

impl AlertMemory {
    pub fn new(now_ms: i64) -> AlertMemory {
        AlertMemory {
            state: AlertState::Ok,
            last_seen_ms: now_ms,
            history: VecDeque::new(),
            history_period: None,
            history_stats: None,
        }
    }
}

fn mean_and_deviation(values: &VecDeque<f64>) -> (f64, f64) {
    let count = values.len() as f64;
    let mean = values.iter().sum::<f64>() / count;
    let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count;
    (mean, variance.sqrt())
}

/// Judges one observation against a rule. `budget` is the budget of this
/// alert's dim value (`budget_used`); `memory` holds `absent`'s last event
/// and `zscore`'s history, both brought up to `now_ms` here.
pub fn judge(
    rule: &Rule,
    observation: &Observation,
    budget: Option<i64>,
    memory: &mut AlertMemory,
    window_ms: Option<i64>,
    now_ms: i64,
) -> Judgement {
    let firing = matches!(memory.state, AlertState::Firing { .. });
    // a hysteresis band: once firing, the value must come back past it
    let band = |threshold: f64| threshold.abs() * RESOLVE_HYSTERESIS;
    match &rule.condition {
        Condition::Absent {} => {
            if observation.recent_events > 0 {
                memory.last_seen_ms = now_ms;
            }
            let silent_ms = now_ms - memory.last_seen_ms;
            Judgement {
                breached: silent_ms >= rule.for_s * 1000,
                cleared: observation.recent_events > 0,
                value: Some((silent_ms / 1000) as f64),
                baseline: None,
                threshold: Some(rule.for_s as f64),
            }
        }
        Condition::Above { value: threshold } | Condition::Below { value: threshold } => {
            let above = matches!(rule.condition, Condition::Above { .. });
            let Some(value) = observation.value else {
                return Judgement::quiet();
            };
            if observation.events < rule.min_count {
                return Judgement {
                    value: Some(value),
                    threshold: Some(*threshold),
                    ..Judgement::quiet()
                };
            }
            let (breached, cleared) = if above {
                (value > *threshold, value <= *threshold - band(*threshold))
            } else {
                (value < *threshold, value >= *threshold + band(*threshold))
            };
            Judgement {
                breached,
                cleared: cleared || !firing && !breached,
                value: Some(value),
                baseline: None,
                threshold: Some(*threshold),
            }
        }
        Condition::DropVsPrev { pct } | Condition::RiseVsPrev { pct } => {
            let drop = matches!(rule.condition, Condition::DropVsPrev { .. });
            let (Some(value), Some(prev)) = (observation.value, observation.prev) else {
                return Judgement::quiet();
            };
            // judged against the window before: its traffic must be enough
            if observation.prev_events < rule.min_count || prev <= 0.0 {
                return Judgement {
                    value: Some(value),
                    baseline: Some(prev),
                    ..Judgement::quiet()
                };
            }
            let change_pct = if drop {
                (prev - value) / prev * 100.0
            } else {
                (value - prev) / prev * 100.0
            };
            let threshold = if drop {
                prev * (1.0 - pct / 100.0)
            } else {
                prev * (1.0 + pct / 100.0)
            };
            Judgement {
                breached: change_pct >= *pct,
                cleared: change_pct < pct * (1.0 - RESOLVE_HYSTERESIS),
                value: Some(value),
                baseline: Some(prev),
                threshold: Some(threshold),
            }
        }
        Condition::Zscore { threshold, history } => {
            let Some(value) = observation.value else {
                return Judgement::quiet();
            };
            // the window that just closed joins the history once per period
            if let Some(window_ms) = window_ms.filter(|ms| *ms > 0) {
                let period = now_ms.div_euclid(window_ms);
                if memory.history_period.is_some_and(|last| last < period) {
                    if let Some(closed) = observation.prev {
                        memory.history.push_back(closed);
                    }
                    while memory.history.len() > *history {
                        memory.history.pop_front();
                    }
                    memory.history_stats = None;
                }
                memory.history_period = Some(period);
            }
            if memory.history.len() < (*history).min(ZSCORE_HISTORY_MIN.max(*history))
                || observation.events < rule.min_count
            {
                return Judgement {
                    value: Some(value),
                    ..Judgement::quiet()
                };
            }
            let (mean, deviation) = *memory
                .history_stats
                .get_or_insert_with(|| mean_and_deviation(&memory.history));
            if deviation <= f64::EPSILON * mean.abs().max(1.0) {
                // a flat history gives no scale to judge by
                return Judgement {
                    value: Some(value),
                    baseline: Some(mean),
                    ..Judgement::quiet()
                };
            }
            let z = (value - mean) / deviation;
            Judgement {
                breached: z.abs() >= *threshold,
                cleared: z.abs() < threshold * (1.0 - RESOLVE_HYSTERESIS),
                value: Some(z),
                baseline: Some(mean),
                threshold: Some(*threshold),
            }
        }
        Condition::BudgetUsed { pct } => {
            let (Some(value), Some(budget)) = (observation.value, budget) else {
                return Judgement::quiet();
            };
            // the budget is money in integer minor units; its share is compared
            let budget = budget as f64;
            let threshold = budget * pct / 100.0;
            Judgement {
                breached: value >= threshold,
                cleared: value < threshold - band(threshold),
                value: Some(value),
                baseline: Some(budget),
                threshold: Some(threshold),
            }
        }
    }
}

/// Moves an alert by one judgement; the transition, if any.
pub fn step(
    rule: &Rule,
    judgement: &Judgement,
    memory: &mut AlertMemory,
    now_ms: i64,
) -> Option<Transition> {
    // absent holds its for_s in the breach itself
    let hold_ms = match rule.condition {
        Condition::Absent {} => 0,
        _ => rule.for_s * 1000,
    };
    let (next, transition) = match memory.state {
        AlertState::Ok if judgement.breached && hold_ms == 0 => (
            AlertState::Firing { since_ms: now_ms },
            Some(Transition::Firing),
        ),
        AlertState::Ok if judgement.breached => (
            AlertState::Pending { since_ms: now_ms },
            Some(Transition::Pending),
        ),
        AlertState::Ok => (AlertState::Ok, None),
        AlertState::Pending { since_ms } if judgement.breached => {
            if now_ms - since_ms >= hold_ms {
                (
                    AlertState::Firing { since_ms: now_ms },
                    Some(Transition::Firing),
                )
            } else {
                (AlertState::Pending { since_ms }, None)
            }
        }
        AlertState::Pending { .. } => (AlertState::Ok, Some(Transition::Ok)),
        AlertState::Firing { .. } if judgement.cleared => {
            (AlertState::Ok, Some(Transition::Resolved))
        }
        AlertState::Firing { since_ms } => (AlertState::Firing { since_ms }, None),
    };
    memory.state = next;
    transition
}

/// The record of a transition, as the outbox keeps it and API.md §7 shows it
/// (`seq` is given when it is written).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    pub seq: u64,
    pub rule: String,
    pub state: Transition,
    /// The alert's labels: tenant, rule, severity and, with `by`, the dim
    /// and its value.
    pub labels: BTreeMap<String, String>,
    /// The dim value the alert watches, when its rule has `by`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim_value: Option<String>,
    pub metric: String,
    pub window: String,
    pub condition: String,
    pub value: Option<f64>,
    pub baseline: Option<f64>,
    pub threshold: Option<f64>,
    pub runbook: Option<String>,
    /// When the transition was judged, in ms since the epoch.
    #[serde(rename = "at")]
    pub at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::SlidingWindow;

    const T0: i64 = 1_763_805_600_000;

    fn rule(condition: Condition) -> Rule {
        Rule {
            id: "r".into(),
            metric: "gmv".into(),
            window: WindowName::Sliding(SlidingWindow::Min15),
            condition,
            by: None,
            min_count: 0,
            for_s: 0,
            severity: "P1".into(),
            runbook: None,
        }
    }

    fn seen(value: f64, events: u64) -> Observation {
        Observation {
            value: Some(value),
            prev: None,
            events,
            prev_events: 0,
            recent_events: events,
        }
    }

    /// Judges and steps one alert through `values` one second apart; the
    /// transitions with their second.
    fn run(rule: &Rule, observations: &[Observation]) -> Vec<(usize, Transition)> {
        let mut memory = AlertMemory::new(T0);
        let mut transitions = Vec::new();
        for (second, observation) in observations.iter().enumerate() {
            let now_ms = T0 + second as i64 * 1000;
            let judgement = judge(rule, observation, None, &mut memory, None, now_ms);
            if let Some(transition) = step(rule, &judgement, &mut memory, now_ms) {
                transitions.push((second, transition));
            }
        }
        transitions
    }

    #[test]
    fn above_fires_past_the_threshold_and_resolves_past_the_hysteresis() {
        let rule = rule(Condition::Above { value: 0.05 });
        let values = [0.04, 0.05, 0.051, 0.049, 0.046, 0.045, 0.06];
        let observations: Vec<Observation> = values.iter().map(|v| seen(*v, 200)).collect();
        // 0.05 is not above; 0.049 and 0.046 stay within 10 % of 0.05
        assert_eq!(
            run(&rule, &observations),
            vec![
                (2, Transition::Firing),
                (5, Transition::Resolved),
                (6, Transition::Firing)
            ]
        );
    }

    #[test]
    fn below_mirrors_above() {
        let rule = rule(Condition::Below { value: 100.0 });
        let observations: Vec<Observation> = [120.0, 99.0, 105.0, 111.0]
            .iter()
            .map(|v| seen(*v, 1))
            .collect();
        assert_eq!(
            run(&rule, &observations),
            vec![(1, Transition::Firing), (3, Transition::Resolved)]
        );
    }

    #[test]
    fn min_count_keeps_thin_traffic_from_firing() {
        let mut rule = rule(Condition::Above { value: 0.05 });
        rule.min_count = 100;
        let observations = [seen(0.5, 99), seen(0.5, 100)];
        assert_eq!(run(&rule, &observations), vec![(1, Transition::Firing)]);
    }

    #[test]
    fn a_breach_must_hold_for_s_and_a_short_one_goes_back_to_ok() {
        let mut rule = rule(Condition::Above { value: 1.0 });
        rule.for_s = 3;
        let values = [2.0, 2.0, 0.5, 2.0, 2.0, 2.0, 2.0];
        let observations: Vec<Observation> = values.iter().map(|v| seen(*v, 1)).collect();
        assert_eq!(
            run(&rule, &observations),
            vec![
                (0, Transition::Pending),
                (2, Transition::Ok),
                (3, Transition::Pending),
                (6, Transition::Firing)
            ]
        );
    }

    #[test]
    fn a_drop_against_the_window_before_fires_and_counts_the_window_before() {
        let mut rule = rule(Condition::DropVsPrev { pct: 30.0 });
        rule.min_count = 10;
        let with_prev = |value: f64, prev: f64, prev_events: u64| Observation {
            value: Some(value),
            prev: Some(prev),
            events: 0,
            prev_events,
            recent_events: 0,
        };
        // 29 % is no drop; 40 % is, though the window now has no events;
        // the window before must have had min_count events
        let observations = [
            with_prev(71.0, 100.0, 50),
            with_prev(60.0, 100.0, 9),
            with_prev(60.0, 100.0, 50),
            with_prev(72.0, 100.0, 50),
            with_prev(74.0, 100.0, 50),
        ];
        assert_eq!(
            run(&rule, &observations),
            vec![(2, Transition::Firing), (4, Transition::Resolved)]
        );
        let mut memory = AlertMemory::new(T0);
        let judged = judge(&rule, &observations[2], None, &mut memory, None, T0);
        assert_eq!(judged.baseline, Some(100.0));
        assert_eq!(judged.threshold, Some(70.0));
    }

    #[test]
    fn a_rise_against_the_window_before_fires() {
        let rule = rule(Condition::RiseVsPrev { pct: 20.0 });
        let observation = |value: f64| Observation {
            value: Some(value),
            prev: Some(0.10),
            events: 100,
            prev_events: 100,
            recent_events: 100,
        };
        assert_eq!(
            run(&rule, &[observation(0.119), observation(0.121)]),
            vec![(1, Transition::Firing)]
        );
    }

    #[test]
    fn absent_fires_after_for_s_of_silence_and_resolves_on_the_next_event() {
        let mut rule = rule(Condition::Absent {});
        rule.for_s = 600;
        let mut memory = AlertMemory::new(T0);
        let quiet = Observation::default();
        let mut transitions = Vec::new();
        for second in 0..=700 {
            let observation = if second < 10 || second == 700 {
                seen(1.0, 1)
            } else {
                quiet
            };
            let now_ms = T0 + second * 1000;
            let judgement = judge(&rule, &observation, None, &mut memory, None, now_ms);
            if let Some(transition) = step(&rule, &judgement, &mut memory, now_ms) {
                transitions.push((second, transition));
            }
        }
        // last seen at second 9: silent for 600 s at second 609
        assert_eq!(
            transitions,
            vec![(609, Transition::Firing), (700, Transition::Resolved)]
        );
    }

    #[test]
    fn budget_used_fires_at_the_share_not_a_unit_before() {
        let rule = rule(Condition::BudgetUsed { pct: 90.0 });
        let mut memory = AlertMemory::new(T0);
        let judged = judge(
            &rule,
            &seen(8_999.0, 1),
            Some(10_000),
            &mut memory,
            None,
            T0,
        );
        assert!(!judged.breached);
        let judged = judge(
            &rule,
            &seen(9_000.0, 1),
            Some(10_000),
            &mut memory,
            None,
            T0,
        );
        assert!(judged.breached);
        assert_eq!(judged.threshold, Some(9_000.0));
        assert_eq!(judged.baseline, Some(10_000.0));
        // no budget for this value: nothing to judge
        assert!(!judge(&rule, &seen(1e9, 1), None, &mut memory, None, T0).breached);
    }

    /// A seeded week of 15-minute totals: daily shape plus noise.
    fn week_of_windows(seed: u64, anomaly_at: Option<usize>) -> Vec<f64> {
        let mut state = seed;
        let mut next = || {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..7 * 96)
            .map(|window| {
                // a sum of twelve uniforms is close to normal (mean 6, sd 1)
                let noise: f64 = (0..12).map(|_| next()).sum::<f64>() - 6.0;
                let value = 10_000.0 + 200.0 * noise;
                if Some(window) == anomaly_at {
                    value * 0.5
                } else {
                    value
                }
            })
            .collect()
    }

    fn zscore_transitions(values: &[f64]) -> Vec<(usize, Transition)> {
        let rule = rule(Condition::Zscore {
            threshold: 5.0,
            history: 96,
        });
        let window_ms = 900_000;
        let mut memory = AlertMemory::new(T0);
        let mut transitions = Vec::new();
        for (window, value) in values.iter().enumerate() {
            // one tick a minute; the window's total is known at its end
            for minute in 0..15 {
                let now_ms = T0 + window as i64 * window_ms + minute * 60_000;
                let prev = window.checked_sub(1).map(|before| values[before]);
                let observation = Observation {
                    value: if minute == 0 { prev } else { Some(*value) },
                    prev,
                    events: 1_000,
                    prev_events: 1_000,
                    recent_events: 1_000,
                };
                let judgement = judge(
                    &rule,
                    &observation,
                    None,
                    &mut memory,
                    Some(window_ms),
                    now_ms,
                );
                if let Some(transition) = step(&rule, &judgement, &mut memory, now_ms) {
                    transitions.push((window, transition));
                }
            }
        }
        transitions
    }

    #[test]
    fn zscore_stays_quiet_over_a_week_and_fires_on_a_planted_anomaly() {
        // a week of 15-minute windows, seven seeds: no false alarm at 5 sigma
        for seed in 1..=7 {
            assert_eq!(
                zscore_transitions(&week_of_windows(seed, None)),
                vec![],
                "seed {seed}"
            );
        }
        let transitions = zscore_transitions(&week_of_windows(1, Some(500)));
        assert_eq!(
            transitions,
            vec![(500, Transition::Firing), (501, Transition::Resolved)]
        );
    }

    #[test]
    fn conditions_name_their_bad_field() {
        assert_eq!(
            Condition::DropVsPrev { pct: 130.0 }.problem().map(|p| p.0),
            Some("condition.pct")
        );
        assert_eq!(
            Condition::Zscore {
                threshold: 3.0,
                history: 1
            }
            .problem()
            .map(|p| p.0),
            Some("condition.history")
        );
        assert_eq!(
            Condition::Above { value: f64::NAN }.problem().map(|p| p.0),
            Some("condition.value")
        );
        assert_eq!(Condition::Absent {}.problem(), None);
    }
}
