//! The statistics of experiment guardrails (API.md §8; docs/experiments.md,
//! when the experiments issue lands): whether a treatment's rate is worse than
//! control's by more than a margin, judged again after every batch without
//! the false stops that repeated fixed-horizon tests make, and whether the
//! variants' sample counts match their split.
//!
//! Owns: the mixture sequential probability ratio test (mSPRT; Johari et al.,
//! "Always Valid Inference"), the fixed-horizon z-test kept for comparison,
//! and the sample-ratio-mismatch test. Pure: counts in, verdicts out.
//! Must not: keep state between looks other than what the caller hands back
//! (`SequentialState`), or read anything.

/// Successes (e.g. errors) out of samples, for one variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Proportion {
    pub samples: u64,
    pub hits: u64,
}

impl Proportion {
    pub fn rate(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.hits as f64 / self.samples as f64)
    }
}

/// How treatment is compared with control, with the margin inside the test:
/// the evidence must be that the difference exceeds the margin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compare {
    /// treatment − control > margin (a rate difference, e.g. 0.01 = 1 point).
    Delta { margin: f64 },
    /// treatment / control > ratio (e.g. 2.0).
    Ratio { ratio: f64 },
}

impl Compare {
    /// The threshold as the rule states it (a difference or a ratio).
    pub fn threshold(&self) -> f64 {
        match *self {
            Compare::Delta { margin } => margin,
            Compare::Ratio { ratio } => ratio,
        }
    }

    /// The estimate on the test's scale, as the rule states it.
    fn observed(&self, theta: f64) -> f64 {
        match self {
            Compare::Delta { .. } => theta,
            Compare::Ratio { .. } => theta.exp(),
        }
    }
}

/// One look's verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The evidence says the treatment is worse by more than the margin.
    pub worse: bool,
    /// The observed difference (or ratio) and the threshold it is held to.
    pub observed: Option<f64>,
    pub threshold: f64,
    /// For the sequential test, the always-valid p-value (the smallest so far);
    /// for the z-test, this look's one-sided p-value.
    pub p_value: f64,
}

/// What the sequential test carries from look to look: its always-valid
/// p-value never rises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequentialState {
    pub p_value: f64,
}

impl Default for SequentialState {
    fn default() -> Self {
        SequentialState { p_value: 1.0 }
    }
}

/// The estimate, its variance and the null value on the test's scale: the
/// difference of rates for `Delta`, the difference of log rates for `Ratio`.
/// Rates are kept off 0 and 1 by half a count, so that a variance exists.
fn estimate(
    control: Proportion,
    treatment: Proportion,
    compare: Compare,
) -> Option<(f64, f64, f64)> {
    if control.samples == 0 || treatment.samples == 0 {
        return None;
    }
    let smoothed = |p: Proportion| (p.hits as f64 + 0.5) / (p.samples as f64 + 1.0);
    let (pc, pt) = (smoothed(control), smoothed(treatment));
    let (nc, nt) = (control.samples as f64, treatment.samples as f64);
    Some(match compare {
        Compare::Delta { margin } => (pt - pc, pt * (1.0 - pt) / nt + pc * (1.0 - pc) / nc, margin),
        Compare::Ratio { ratio } => (
            pt.ln() - pc.ln(),
            (1.0 - pt) / (nt * pt) + (1.0 - pc) / (nc * pc),
            ratio.max(f64::MIN_POSITIVE).ln(),
        ),
    })
}

/// The mixture's spread (τ²): differences of the size of the margin, or of
/// half the control rate (on the log scale: a ratio of 1.5) where the margin
/// is smaller; a wider mixture detects large effects sooner and small ones
/// later.
fn mixture_variance(control: Proportion, compare: Compare) -> f64 {
    let tau = match compare {
        Compare::Delta { margin } => margin
            .abs()
            .max(0.5 * control.rate().unwrap_or(0.0))
            .max(1e-4),
        Compare::Ratio { ratio } => ratio.max(f64::MIN_POSITIVE).ln().abs().max(1.5f64.ln()),
    };
    tau * tau
}

/// The mixture likelihood ratio of the estimate `theta` (variance `v`)
/// against the null `theta0`, with a normal mixture of variance `tau2`.
fn mixture_likelihood_ratio(theta: f64, v: f64, theta0: f64, tau2: f64) -> f64 {
    let distance = theta - theta0;
    ((v / (v + tau2)).sqrt().ln() + tau2 * distance * distance / (2.0 * v * (v + tau2))).exp()
}

/// The sequential test at one look: worse when the always-valid p-value is
/// below `1 − confidence` and the estimate is past the null (one-sided, so
/// an improvement never stops an experiment).
pub fn sequential(
    control: Proportion,
    treatment: Proportion,
    compare: Compare,
    confidence: f64,
    state: &mut SequentialState,
) -> Verdict {
    let threshold = compare.threshold();
    let Some((theta, v, theta0)) = estimate(control, treatment, compare) else {
        return Verdict {
            worse: false,
            observed: None,
            threshold,
            p_value: state.p_value,
        };
    };
    let observed = compare.observed(theta);
    if theta > theta0 && v > 0.0 {
        let likelihood =
            mixture_likelihood_ratio(theta, v, theta0, mixture_variance(control, compare));
        state.p_value = state.p_value.min((1.0 / likelihood).min(1.0));
    }
    Verdict {
        worse: theta > theta0 && state.p_value < 1.0 - confidence,
        observed: Some(observed),
        threshold,
        p_value: state.p_value,
    }
}

/// The share of control's events above its own p95.
pub const P95_TAIL: f64 = 0.05;

/// A `p95` guardrail at one look (`stat = "p95"`, `compare = "delta"`): is
/// the treatment's p95 more than `threshold` above control's? It is, exactly
/// when more than 5 % of the treatment's events lie above control's p95 plus
/// the threshold; so the test is a sequential one-sample test that the share
/// of treatment events above that line (`above` of `treatment_samples`)
/// exceeds 5 %, with the same mixture as the rate guardrails. The caller counts
/// the share from the treatment's histogram at control's current p95 plus the
/// threshold; with control's p95 estimated from thousands of events, its own
/// error is small against the test's.
pub fn sequential_p95(
    above: u64,
    treatment_samples: u64,
    threshold_ms: f64,
    confidence: f64,
    state: &mut SequentialState,
) -> Verdict {
    if treatment_samples == 0 {
        return Verdict {
            worse: false,
            observed: None,
            threshold: threshold_ms,
            p_value: state.p_value,
        };
    }
    let n = treatment_samples as f64;
    let share = (above as f64 + 0.5) / (n + 1.0);
    let v = share * (1.0 - share) / n;
    if share > P95_TAIL && v > 0.0 {
        // a share of 10 % above the line: the size of difference to catch
        let tau2 = P95_TAIL * P95_TAIL;
        let likelihood = mixture_likelihood_ratio(share, v, P95_TAIL, tau2);
        state.p_value = state.p_value.min((1.0 / likelihood).min(1.0));
    }
    Verdict {
        worse: share > P95_TAIL && state.p_value < 1.0 - confidence,
        observed: Some(share),
        threshold: threshold_ms,
        p_value: state.p_value,
    }
}

/// The fixed-horizon one-sided z-test at one look, valid only if looked at
/// once (`method = "z"`, kept for comparison: repeated looks stop far more
/// than `1 − confidence` of experiments with no effect).
pub fn z_test(
    control: Proportion,
    treatment: Proportion,
    compare: Compare,
    confidence: f64,
) -> Verdict {
    let threshold = compare.threshold();
    let Some((theta, v, theta0)) = estimate(control, treatment, compare) else {
        return Verdict {
            worse: false,
            observed: None,
            threshold,
            p_value: 1.0,
        };
    };
    let z = (theta - theta0) / v.sqrt();
    let p_value = normal_upper_tail(z);
    Verdict {
        worse: p_value < 1.0 - confidence,
        observed: Some(compare.observed(theta)),
        threshold,
        p_value,
    }
}

/// P(Z > z) for a standard normal Z (Abramowitz and Stegun 7.1.26 through
/// erfc, absolute error below 1.5e-7).
pub fn normal_upper_tail(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erfc = poly * (-x * x).exp();
    if z >= 0.0 {
        erfc / 2.0
    } else {
        1.0 - erfc / 2.0
    }
}

/// The looks at which the sample-ratio test is judged: when the samples reach
/// 1 000, then each time they double. At most `SRM_LOOKS_MAX` looks, each at
/// `SRM_ALPHA / SRM_LOOKS_MAX` (Bonferroni), so that an experiment whose
/// split holds is flagged in at most `SRM_ALPHA` of runs however long it runs.
pub const SRM_ALPHA: f64 = 0.001;
pub const SRM_LOOKS_MAX: u32 = 30;
pub const SRM_FIRST_LOOK: u64 = 1_000;

/// The look a sample count has reached (0 before the first).
pub fn srm_look(samples: u64) -> u32 {
    if samples < SRM_FIRST_LOOK {
        0
    } else {
        (64 - (samples / SRM_FIRST_LOOK).leading_zeros()).min(SRM_LOOKS_MAX)
    }
}

/// Pearson's chi-square of the variants' counts against their expected shares
/// (`split`, summing to 1), and its p-value (k − 1 degrees of freedom).
pub fn sample_ratio(counts: &[u64], split: &[f64]) -> Option<(f64, f64)> {
    if counts.len() != split.len() || counts.len() < 2 {
        return None;
    }
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let mut statistic = 0.0;
    for (count, share) in counts.iter().zip(split) {
        let expected = total as f64 * share;
        if expected <= 0.0 {
            return None;
        }
        let deviation = *count as f64 - expected;
        statistic += deviation * deviation / expected;
    }
    let freedom = (counts.len() - 1) as f64;
    Some((statistic, chi_square_upper_tail(statistic, freedom)))
}

/// True when the counts mismatch the split at this look's corrected level.
pub fn sample_ratio_mismatch(counts: &[u64], split: &[f64]) -> bool {
    sample_ratio(counts, split)
        .is_some_and(|(_, p_value)| p_value < SRM_ALPHA / SRM_LOOKS_MAX as f64)
}

/// P(X > x) for a chi-square X with `k` degrees of freedom: the regularized
/// upper incomplete gamma Q(k/2, x/2) (series below a + 1, continued fraction
/// above, as Numerical Recipes).
pub fn chi_square_upper_tail(x: f64, k: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let (a, x) = (k / 2.0, x / 2.0);
    let log_prefix = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        // P by its series; Q = 1 − P
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..500 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        (1.0 - sum * log_prefix.exp()).clamp(0.0, 1.0)
    } else {
        // Lentz's continued fraction for Q
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..500 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let step = d * c;
            h *= step;
            if (step - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (log_prefix.exp() * h).clamp(0.0, 1.0)
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // reflection
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (i, c) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// splitmix64, for seeded simulations (also the experiments' tests).
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Hits among `n` samples at `rate` (a binomial draw: the gaps between
        /// hits are geometric, so a draw costs one number a hit).
        pub(crate) fn hits(&mut self, n: u64, rate: f64) -> u64 {
            let log_miss = (1.0 - rate).ln();
            let (mut at, mut hits) = (0u64, 0u64);
            loop {
                let gap = ((1.0 - self.next()).ln() / log_miss).floor() as u64;
                at = at.saturating_add(gap).saturating_add(1);
                if at > n {
                    return hits;
                }
                hits += 1;
            }
        }

        /// A standard normal draw (Box-Muller).
        fn normal(&mut self) -> f64 {
            let (u, v) = (1.0 - self.next(), self.next());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    /// Runs experiments of `batches` batches of `batch` samples a variant,
    /// judged after every batch; the share that stopped and the median
    /// samples (per variant) at the stop.
    fn simulate(
        runs: u64,
        control_rate: f64,
        treatment_rate: f64,
        compare: Compare,
        sequential_method: bool,
        batches: u64,
        batch: u64,
    ) -> (f64, Option<u64>) {
        let mut stopped = 0;
        let mut stops_at = Vec::new();
        for seed in 0..runs {
            let mut rng = Rng(seed * 7_919 + 17);
            let (mut control, mut treatment) = (Proportion::default(), Proportion::default());
            let mut state = SequentialState::default();
            for look in 1..=batches {
                control.samples += batch;
                control.hits += rng.hits(batch, control_rate);
                treatment.samples += batch;
                treatment.hits += rng.hits(batch, treatment_rate);
                let verdict = if sequential_method {
                    sequential(control, treatment, compare, 0.95, &mut state)
                } else {
                    z_test(control, treatment, compare, 0.95)
                };
                if verdict.worse {
                    stopped += 1;
                    stops_at.push(look * batch);
                    break;
                }
            }
        }
        stops_at.sort_unstable();
        (
            stopped as f64 / runs as f64,
            stops_at.get(stops_at.len() / 2).copied(),
        )
    }

    #[test]
    fn a_a_experiments_looked_at_after_every_batch_stop_rarely_with_the_sequential_test() {
        let ratio = Compare::Ratio { ratio: 1.0 };
        let (sequential_share, _) = simulate(1_000, 0.02, 0.02, ratio, true, 50, 200);
        let (z_share, _) = simulate(1_000, 0.02, 0.02, ratio, false, 50, 200);
        println!(
            "A/A, 1 000 runs, 50 looks: sequential stops {sequential_share}, z stops {z_share}"
        );
        assert!(sequential_share <= 0.05, "{sequential_share}");
        // the reason for the default: peeking at a fixed-horizon test
        assert!(z_share > 0.05, "{z_share}");
    }

    #[test]
    fn a_treatment_two_and_a_half_times_worse_is_stopped() {
        let (share, median) = simulate(
            200,
            0.02,
            0.05,
            Compare::Ratio { ratio: 2.0 },
            true,
            100,
            1_000,
        );
        println!("2.5x against ratio 2.0: stopped {share}, median samples {median:?}");
        assert!(share >= 0.95, "{share}");
    }

    #[test]
    fn a_difference_below_the_margin_does_not_stop_and_one_above_does() {
        let margin = Compare::Delta { margin: 0.01 };
        // a true difference of half a point against a margin of one
        let (below, _) = simulate(400, 0.02, 0.025, margin, true, 50, 1_000);
        println!("half a point against a 1-point margin: stopped {below}");
        assert!(below <= 0.05, "{below}");
        let (above, median) = simulate(200, 0.02, 0.05, margin, true, 50, 1_000);
        println!("3 points against a 1-point margin: stopped {above}, median samples {median:?}");
        assert!(above >= 0.95, "{above}");
    }

    /// Latencies of 100 ms plus an exponential of mean 200 ms (p95 about
    /// 699 ms), in a histogram of 1 ms buckets up to 20 s.
    struct Latencies {
        buckets: Vec<u64>,
        count: u64,
    }

    impl Latencies {
        fn new() -> Latencies {
            Latencies {
                buckets: vec![0; 20_000],
                count: 0,
            }
        }

        fn add(&mut self, rng: &mut Rng, shift_ms: f64, n: u64) {
            for _ in 0..n {
                let ms = 100.0 + shift_ms - 200.0 * (1.0 - rng.next()).ln();
                self.buckets[(ms as usize).min(19_999)] += 1;
                self.count += 1;
            }
        }

        fn p95(&self) -> f64 {
            let rank = (self.count as f64 * 0.95).ceil() as u64;
            let mut seen = 0;
            for (ms, count) in self.buckets.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return ms as f64;
                }
            }
            20_000.0
        }

        fn above(&self, line_ms: f64) -> u64 {
            self.buckets[(line_ms as usize + 1).min(20_000)..]
                .iter()
                .sum()
        }
    }

    /// Share of runs a p95 guardrail of `threshold_ms` stops when the
    /// treatment's latencies are `shift_ms` slower, judged after every batch.
    fn simulate_p95(runs: u64, shift_ms: f64, threshold_ms: f64) -> (f64, Option<u64>) {
        let (mut stopped, mut stops_at) = (0, Vec::new());
        for seed in 0..runs {
            let mut rng = Rng(seed * 104_729 + 3);
            let (mut control, mut treatment) = (Latencies::new(), Latencies::new());
            let mut state = SequentialState::default();
            for look in 1..=40u64 {
                control.add(&mut rng, 0.0, 500);
                treatment.add(&mut rng, shift_ms, 500);
                let line = control.p95() + threshold_ms;
                let verdict = sequential_p95(
                    treatment.above(line),
                    treatment.count,
                    threshold_ms,
                    0.95,
                    &mut state,
                );
                if verdict.worse {
                    stopped += 1;
                    stops_at.push(look * 500);
                    break;
                }
            }
        }
        stops_at.sort_unstable();
        (
            stopped as f64 / runs as f64,
            stops_at.get(stops_at.len() / 2).copied(),
        )
    }

    #[test]
    fn a_p95_guardrail_stops_a_slower_treatment_and_not_one_within_the_threshold() {
        // 400 ms slower against a threshold of 200 ms: stopped
        let (slower, median) = simulate_p95(100, 400.0, 200.0);
        println!("p95 400 ms slower, threshold 200: stopped {slower}, median samples {median:?}");
        assert!(slower >= 0.95, "{slower}");
        // 100 ms slower (within the threshold) and the same: rarely
        let (within, _) = simulate_p95(200, 100.0, 200.0);
        let (same, _) = simulate_p95(200, 0.0, 200.0);
        // exactly at the threshold: the null's edge
        let (at, _) = simulate_p95(200, 200.0, 200.0);
        let (beyond, beyond_median) = simulate_p95(100, 300.0, 200.0);
        println!(
            "p95 100 ms slower: stopped {within}; the same: {same}; 200 ms: {at}; \
             300 ms: {beyond}, median samples {beyond_median:?}"
        );
        assert!(
            within <= 0.05 && same <= 0.05 && at <= 0.05,
            "{within} {same} {at}"
        );
    }

    #[test]
    fn the_chi_square_tail_matches_known_values() {
        // chi-square(1) at 3.841 is 0.05; chi-square(2) at 5.991 is 0.05;
        // chi-square(3) at 16.266 is 0.001
        assert!((chi_square_upper_tail(3.841_458_8, 1.0) - 0.05).abs() < 1e-6);
        assert!((chi_square_upper_tail(5.991_464_5, 2.0) - 0.05).abs() < 1e-6);
        assert!((chi_square_upper_tail(16.266_236, 3.0) - 0.001).abs() < 1e-6);
        assert!((normal_upper_tail(1.644_853_6) - 0.05).abs() < 1e-6);
    }

    #[test]
    fn a_52_48_split_is_a_mismatch_and_50_50_stays_quiet() {
        assert!(sample_ratio_mismatch(&[52_000, 48_000], &[0.5, 0.5]));
        // 50/50 runs, judged at every look of the schedule up to 2 048 000
        let mut flagged = 0;
        let runs = 2_000;
        for seed in 0..runs {
            let mut rng = Rng(seed + 1);
            let mut counts = [0u64; 2];
            let mut look = 0;
            let mut samples = 0u64;
            while samples < 256_000 {
                // batches of 1 000, each sample to A or B with even odds (the
                // binomial's normal approximation, exact enough at 1 000)
                let to_a = (500.0 + 250f64.sqrt() * rng.normal())
                    .round()
                    .clamp(0.0, 1_000.0) as u64;
                counts[0] += to_a;
                counts[1] += 1_000 - to_a;
                samples += 1_000;
                if srm_look(samples) > look {
                    look = srm_look(samples);
                    if sample_ratio_mismatch(&counts, &[0.5, 0.5]) {
                        flagged += 1;
                        break;
                    }
                }
            }
        }
        let quiet = 1.0 - flagged as f64 / runs as f64;
        assert!(quiet >= 0.999, "{quiet}");
        assert_eq!(srm_look(999), 0);
        assert_eq!(srm_look(1_000), 1);
        assert_eq!(srm_look(2_000), 2);
        assert_eq!(srm_look(3_999), 2);
    }
}
