//! `GET /metrics` (API.md §9): the exporter's node telemetry, then the current
//! window values of every tenant (unless `prometheus.tenant_values = false`),
//! at most `prometheus.tenant_series_max` samples, in the Prometheus text format;
//! each caller sees what it may read (`ScrapeView`): tenant data only with a
//! key that may read that tenant.
//! Tenant values include each experiment's state (`tally_experiment_state`):
//! its id is a label from the API, a checked name, at most
//! `experiments.per_tenant_max` a tenant, and gone from the next scrape once
//! deleted.
//! Must not: let a scrape stall ingestion (tenant reads take a read permit like
//! any read; a busy tenant is left out of that scrape) or expose other label
//! values that do not come from config.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::actors::TenantHandle;
use crate::auth::{Caller, Principal};
use crate::domain::time::WindowName;
use crate::node::Node;
use crate::read::{TenantReader, WindowView};
use crate::telemetry;

use super::error::ApiError;

/// The families of tenant window samples (name, type, help), in the order they
/// are written. Quantiles are a summary: only summaries may carry `quantile`.
const FAMILIES: [(&str, &str, &str); 11] = [
    (
        "tally_window_value",
        "gauge",
        "current value of a metric's window (sum, count, ratio or mean; the metric's unit)",
    ),
    (
        "tally_window_prev_value",
        "gauge",
        "value of the window before the current one (30s and 15m)",
    ),
    (
        "tally_window_events",
        "gauge",
        "events counted in the window (ratios: the denominator)",
    ),
    (
        "tally_window_prev_events",
        "gauge",
        "events counted in the window before the current one",
    ),
    (
        "tally_window_numerator",
        "gauge",
        "ratio metrics: events counted in the numerator",
    ),
    (
        "tally_window_quantile",
        "summary",
        "histogram metrics: value at the quantile (the metric's unit)",
    ),
    (
        "tally_window_max",
        "gauge",
        "histogram metrics: largest value in the window",
    ),
    (
        "tally_window_mean_denominator",
        "gauge",
        "mean metrics: the count the mean divides by",
    ),
    (
        "tally_experiment_state",
        "gauge",
        "1 for the state each experiment is in (running, paused, stopped), 0 for the others",
    ),
    (
        crate::telemetry::EVENT_FRESHNESS_SECONDS,
        "histogram",
        "from an accepted event's time (ts, or its receipt) to its acknowledgement (durable and counted), by tenant",
    ),
    (
        crate::telemetry::LIVE_VISIBLE_SECONDS,
        "histogram",
        "from an acknowledgement to the first live frame that holds it, by tenant (while someone watches)",
    ),
];

/// `FAMILIES` index of `tally_experiment_state`.
const EXPERIMENT_STATE: usize = 8;
/// `FAMILIES` indices of the freshness histograms.
const EVENT_FRESHNESS: usize = 9;
const LIVE_VISIBLE: usize = 10;

/// Samples collected per family, then written family by family (the text
/// format wants each family's samples together).
struct Samples {
    by_family: Vec<Vec<String>>,
    written: usize,
    dropped: usize,
    max: usize,
}

impl Samples {
    fn push(&mut self, family: usize, labels: &str, value: &str) {
        if self.written >= self.max {
            self.dropped += 1;
            return;
        }
        self.written += 1;
        self.by_family[family].push(format!("{}{{{labels}}} {value}", FAMILIES[family].0));
    }

    /// A whole sample line of a family (a histogram's `_bucket`, `_sum` and
    /// `_count` lines).
    fn push_line(&mut self, family: usize, line: String) {
        if self.written >= self.max {
            self.dropped += 1;
            return;
        }
        self.written += 1;
        self.by_family[family].push(line);
    }

    fn push_int(&mut self, family: usize, labels: &str, value: i128) {
        self.push(family, labels, &value.to_string());
    }

    fn push_float(&mut self, family: usize, labels: &str, value: Option<f64>) {
        if let Some(value) = value.filter(|v| v.is_finite()) {
            self.push(family, labels, &value.to_string());
        }
    }
}

/// What a scrape shows (API.md §9, docs/api.md "Prometheus").
#[derive(Debug, Clone, PartialEq, Eq)]
enum ScrapeView {
    /// No key, and `prometheus.bearer_token` empty: node telemetry without any
    /// sample that carries a tenant label, and no tenant values.
    Node,
    /// A tenant key: that tenant's samples only (its telemetry and values).
    Tenant(String),
    /// The scrape token or an admin key: everything.
    All,
}

/// Who may scrape what: a key always says; without one, node telemetry
/// only, and only while `prometheus.bearer_token` is empty.
fn scrape_view(node: &Node, caller: &Caller) -> Result<ScrapeView, ApiError> {
    match caller {
        Caller::Scrape | Caller::Key(Principal::Admin) => Ok(ScrapeView::All),
        Caller::Key(Principal::Tenant(tenant)) => Ok(ScrapeView::Tenant(tenant.clone())),
        Caller::Anonymous if !node.keys.scrape_needs_key() => Ok(ScrapeView::Node),
        Caller::Anonymous | Caller::Invalid => Err(ApiError::Unauthorized),
    }
}

/// The tenant a sample line is labelled with, if any (tenant ids are
/// `[a-z0-9_-]`, so the label value needs no unescaping).
fn sample_tenant(line: &str) -> Option<&str> {
    if line.starts_with('#') {
        return None;
    }
    let labels = &line[line.find('{')? + 1..];
    let start = if labels.starts_with("tenant=\"") {
        0
    } else {
        labels.find(",tenant=\"")? + 1
    };
    let value = &labels[start + "tenant=\"".len()..];
    value.find('"').map(|end| &value[..end])
}

/// The exporter's telemetry as `view` may see it: for `All` every line
/// but those of tenants no longer `serving`; for `Node` the samples without
/// a tenant label; for a tenant, its own labelled samples (node-wide figures
/// sum every tenant's traffic; the audit's `*`, about every tenant, is not
/// one). The exporter cannot forget a series, so a
/// removed tenant's would be scraped until the next start; left out here,
/// they go stale in Prometheus as soon as the tenant goes (its id is
/// retired, so no series comes back).
fn telemetry_for(rendered: String, view: &ScrapeView, serving: impl Fn(&str) -> bool) -> String {
    match view {
        ScrapeView::All => rendered
            .lines()
            .filter(|line| {
                sample_tenant(line)
                    .is_none_or(|tenant| tenant == crate::audit::EVERY_TENANT || serving(tenant))
            })
            .flat_map(|line| [line, "\n"])
            .collect(),
        ScrapeView::Node => rendered
            .lines()
            .filter(|line| sample_tenant(line).is_none())
            .flat_map(|line| [line, "\n"])
            .collect(),
        ScrapeView::Tenant(tenant) => rendered
            .lines()
            .filter(|line| line.starts_with('#') || sample_tenant(line) == Some(tenant.as_str()))
            .flat_map(|line| [line, "\n"])
            .collect(),
    }
}

pub async fn get_metrics(State(node): State<Arc<Node>>, caller: Caller) -> Response {
    let view = match scrape_view(&node, &caller) {
        Ok(view) => view,
        Err(error) => return error.into_response(),
    };
    telemetry::collect_process_metrics();
    let mut text = String::new();
    let tenants: Vec<(String, Arc<TenantHandle>)> = match &view {
        ScrapeView::Node => Vec::new(),
        ScrapeView::Tenant(tenant) => node
            .tenant(tenant)
            .map(|handle| (tenant.clone(), handle))
            .into_iter()
            .collect(),
        ScrapeView::All => node.tenant_list(),
    };
    let mut rows = 0;
    if node.config.prometheus.tenant_values && !tenants.is_empty() {
        let samples = tenant_samples(&node, tenants).await;
        rows = samples.written;
        if samples.dropped > 0 {
            telemetry::count_tenant_series_dropped(samples.dropped as u64);
        }
        for (family, (name, kind, help)) in FAMILIES.iter().enumerate() {
            if samples.by_family[family].is_empty() {
                continue;
            }
            let _ = writeln!(text, "# HELP {name} {help}");
            let _ = writeln!(text, "# TYPE {name} {kind}");
            for line in &samples.by_family[family] {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    // the tenant families after the exporter's, each family whole
    let mut rendered = telemetry_for(node.prometheus.render(), &view, |tenant| {
        node.tenant(tenant).is_some()
    });
    rendered.push_str(&text);
    let mut response = (StatusCode::OK, rendered).into_response();
    response
        .extensions_mut()
        .insert(crate::audit::AuditRows(rows as u64));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn tenant_samples(node: &Node, tenants: Vec<(String, Arc<TenantHandle>)>) -> Samples {
    let mut samples = Samples {
        by_family: vec![Vec::new(); FAMILIES.len()],
        written: 0,
        dropped: 0,
        max: node.config.prometheus.tenant_series_max,
    };
    // `tenant_list` is sorted by id
    let now_ms = node.now_ms();
    for (tenant_id, tenant) in tenants {
        let tenant_id = &tenant_id;
        let views = match TenantReader::begin(&tenant) {
            Ok(reader) => reader.all(now_ms).await,
            Err(error) => Err(error),
        };
        // a busy or failed tenant is left out rather than stall the scrape
        let views = match views {
            Ok(views) => views,
            Err(error) => {
                tracing::warn!(tenant = %tenant_id, %error, "its window values are left out of this scrape");
                continue;
            }
        };
        for (name, view) in views {
            for (window, window_view) in &view.windows {
                let labels = format!(
                    "tenant=\"{tenant_id}\",metric=\"{name}\",window=\"{}\"",
                    window.name()
                );
                window_samples(&mut samples, &labels, *window, window_view);
            }
        }
        if let Some(feed) = node.feeds.get(tenant_id) {
            for (family, histogram) in [
                (EVENT_FRESHNESS, &feed.event_freshness),
                (LIVE_VISIBLE, &feed.live_visible),
            ] {
                let name = FAMILIES[family].0;
                let (buckets, sum, count) = histogram.read();
                for (bound, cumulative) in buckets {
                    let le = if bound.is_finite() {
                        bound.to_string()
                    } else {
                        "+Inf".to_string()
                    };
                    samples.push_line(
                        family,
                        format!("{name}_bucket{{tenant=\"{tenant_id}\",le=\"{le}\"}} {cumulative}"),
                    );
                }
                samples.push_line(
                    family,
                    format!("{name}_sum{{tenant=\"{tenant_id}\"}} {sum}"),
                );
                samples.push_line(
                    family,
                    format!("{name}_count{{tenant=\"{tenant_id}\"}} {count}"),
                );
            }
        }
        let experiments = node
            .experiments
            .get(tenant_id)
            .map(|experiments| experiments.list())
            .unwrap_or_default();
        for experiment in experiments {
            for state in ["running", "paused", "stopped"] {
                let labels = format!(
                    "tenant=\"{tenant_id}\",experiment=\"{}\",state=\"{state}\"",
                    experiment.id
                );
                let value = i128::from(experiment.state.name() == state);
                samples.push_int(EXPERIMENT_STATE, &labels, value);
            }
        }
    }
    samples
}

/// The samples of one window of one metric, from its view.
fn window_samples(samples: &mut Samples, labels: &str, window: WindowName, view: &WindowView) {
    let sliding = window != WindowName::Today;
    match view {
        WindowView::Histogram(stats) => {
            samples.push_int(2, labels, stats.count as i128);
            for (quantile, value) in [
                ("0.5", stats.p50),
                ("0.9", stats.p90),
                ("0.95", stats.p95),
                ("0.99", stats.p99),
            ] {
                if let Some(value) = value {
                    samples.push_int(
                        5,
                        &format!("{labels},quantile=\"{quantile}\""),
                        value as i128,
                    );
                }
            }
            if let Some(max) = stats.max {
                samples.push_int(6, labels, max as i128);
            }
        }
        WindowView::Mean { current, .. } => {
            samples.push_float(0, labels, view.value());
            samples.push_int(7, labels, current.count);
            if sliding {
                samples.push_float(1, labels, view.prev_value());
            }
        }
        WindowView::Ratio { current, prev } => {
            samples.push_float(0, labels, view.value());
            samples.push_int(2, labels, current.count as i128);
            samples.push_int(4, labels, current.sum);
            if let Some(prev) = prev {
                samples.push_float(1, labels, view.prev_value());
                samples.push_int(3, labels, prev.count as i128);
            }
        }
        WindowView::Sum { current, prev } => {
            samples.push_int(0, labels, current.sum);
            samples.push_int(2, labels, current.count as i128);
            if let Some(prev) = prev {
                samples.push_int(1, labels, prev.sum);
                samples.push_int(3, labels, prev.count as i128);
            }
        }
        WindowView::Count { current, prev } => {
            samples.push_int(0, labels, current.count as i128);
            samples.push_int(2, labels, current.count as i128);
            if let Some(prev) = prev {
                samples.push_int(1, labels, prev.count as i128);
                samples.push_int(3, labels, prev.count as i128);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RENDERED: &str = "# HELP tally_events_total events\n\
        # TYPE tally_events_total counter\n\
        tally_events_total{outcome=\"accepted\"} 7\n\
        tally_quarantine_events{tenant=\"demo\"} 2\n\
        tally_alert_firing{rule=\"r\",tenant=\"acme\",severity=\"P1\"} 1\n\
        tally_audit_large_reads_total{tenant=\"*\"} 4\n\
        tally_series_folded_total{dim_tenant=\"demo\",metric=\"m\"} 3\n\
        process_open_fds 12\n";

    #[test]
    fn a_sample_line_names_its_tenant() {
        assert_eq!(sample_tenant("a{tenant=\"demo\"} 1"), Some("demo"));
        assert_eq!(
            sample_tenant("a{rule=\"r\",tenant=\"acme\"} 1"),
            Some("acme")
        );
        assert_eq!(sample_tenant("a{dim_tenant=\"demo\"} 1"), None);
        assert_eq!(sample_tenant("a 1"), None);
        assert_eq!(sample_tenant("# HELP a{tenant=\"demo\"}"), None);
    }

    #[test]
    fn each_view_sees_only_what_it_may_read() {
        let serving = |_: &str| true;
        let node = telemetry_for(RENDERED.to_string(), &ScrapeView::Node, serving);
        assert!(!node.contains("{tenant=") && !node.contains(",tenant="));
        // a dim named tenant is not the tenant label
        assert!(node.contains("dim_tenant=\"demo\""));
        assert!(node.contains("tally_events_total{outcome=\"accepted\"} 7\n"));
        assert!(node.contains("process_open_fds 12\n"));
        let demo = telemetry_for(
            RENDERED.to_string(),
            &ScrapeView::Tenant("demo".into()),
            serving,
        );
        assert_eq!(
            demo.lines()
                .filter(|line| !line.starts_with('#'))
                .collect::<Vec<_>>(),
            ["tally_quarantine_events{tenant=\"demo\"} 2"]
        );
        assert_eq!(
            telemetry_for(RENDERED.to_string(), &ScrapeView::All, serving),
            RENDERED
        );
    }

    #[test]
    fn a_removed_tenants_telemetry_is_left_out() {
        // demo serves, acme was removed; `*` is about every tenant
        let all = telemetry_for(RENDERED.to_string(), &ScrapeView::All, |tenant| {
            tenant == "demo"
        });
        assert_eq!(
            all,
            RENDERED.replace(
                "tally_alert_firing{rule=\"r\",tenant=\"acme\",severity=\"P1\"} 1\n",
                ""
            )
        );
    }
}
