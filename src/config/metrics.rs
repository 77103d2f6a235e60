//! `[[metrics]]`: the metric catalogue as written (`MetricConfig`), and its
//! check into the domain's `Catalogue`, every problem named by path.

use std::collections::HashSet;

use serde::Deserialize;

use crate::domain::catalogue::{Catalogue, MetricDef, MetricKind, SumField, METRICS_MAX};
use crate::domain::event::is_valid_type;

use super::{is_identifier, issue, Config, ConfigIssue};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    pub name: String,
    pub kind: MetricKindName,
    #[serde(default)]
    pub help: String,
    /// sum, count, histogram: the event types counted.
    #[serde(default)]
    pub types: Vec<String>,
    /// sum: `amount` (default) or `value`.
    #[serde(default)]
    pub field: Option<String>,
    /// ratio: numerator and denominator event types.
    #[serde(default)]
    pub numerator: Vec<String>,
    #[serde(default)]
    pub denominator: Vec<String>,
    /// mean: the sum metric divided by the count metric, times `scale`.
    #[serde(default)]
    pub sum_metric: Option<String>,
    #[serde(default)]
    pub count_metric: Option<String>,
    #[serde(default)]
    pub scale: Option<u32>,
    #[serde(default)]
    pub dims: Vec<String>,
}

/// The `kind` of a `[[metrics]]` entry; which other keys apply follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKindName {
    Sum,
    Count,
    Ratio,
    Histogram,
    Mean,
}

impl std::fmt::Display for MetricKindName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MetricKindName::Sum => "sum",
            MetricKindName::Count => "count",
            MetricKindName::Ratio => "ratio",
            MetricKindName::Histogram => "histogram",
            MetricKindName::Mean => "mean",
        })
    }
}

impl Config {
    /// The metric catalogue, or every problem of `[[metrics]]`.
    pub fn catalogue(&self) -> Result<Catalogue, Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        if self.metrics.len() > METRICS_MAX {
            issues.push(issue("metrics", format!("at most {METRICS_MAX} metrics")));
        }
        let mut names = HashSet::new();
        let mut defs = Vec::new();
        for (m, metric) in self.metrics.iter().enumerate() {
            let at = format!("metrics[{m}]");
            if !is_identifier(&metric.name, 64) {
                issues.push(issue(format!("{at}.name"), "must match [a-z0-9_-]{1,64}"));
            } else if !names.insert(metric.name.as_str()) {
                issues.push(issue(
                    format!("{at}.name"),
                    "metric name is used more than once",
                ));
            }
            let check_types = |issues: &mut Vec<ConfigIssue>, key: &str, types: &[String]| {
                if types.is_empty() {
                    issues.push(issue(
                        format!("{at}.{key}"),
                        "must name at least one event type",
                    ));
                }
                for (i, event_type) in types.iter().enumerate() {
                    if !is_valid_type(event_type) {
                        issues.push(issue(
                            format!("{at}.{key}[{i}]"),
                            "must match [a-z0-9_.-]{1,64}",
                        ));
                    }
                }
            };
            let unused = |issues: &mut Vec<ConfigIssue>, key: &str, present: bool| {
                if present {
                    issues.push(issue(
                        format!("{at}.{key}"),
                        format!("does not apply to kind {}", metric.kind),
                    ));
                }
            };
            let kind = match metric.kind {
                MetricKindName::Sum | MetricKindName::Count | MetricKindName::Histogram => {
                    check_types(&mut issues, "types", &metric.types);
                    unused(&mut issues, "numerator", !metric.numerator.is_empty());
                    unused(&mut issues, "denominator", !metric.denominator.is_empty());
                    unused(&mut issues, "sum_metric", metric.sum_metric.is_some());
                    unused(&mut issues, "count_metric", metric.count_metric.is_some());
                    unused(&mut issues, "scale", metric.scale.is_some());
                    match metric.kind {
                        MetricKindName::Sum => match metric.field.as_deref() {
                            None | Some("amount") => MetricKind::Sum {
                                field: SumField::Amount,
                            },
                            Some("value") => MetricKind::Sum {
                                field: SumField::Value,
                            },
                            Some(_) => {
                                issues
                                    .push(issue(format!("{at}.field"), "must be amount or value"));
                                MetricKind::Sum {
                                    field: SumField::Amount,
                                }
                            }
                        },
                        MetricKindName::Count => {
                            unused(&mut issues, "field", metric.field.is_some());
                            MetricKind::Count
                        }
                        _ => {
                            unused(&mut issues, "field", metric.field.is_some());
                            MetricKind::Histogram
                        }
                    }
                }
                MetricKindName::Ratio => {
                    check_types(&mut issues, "numerator", &metric.numerator);
                    check_types(&mut issues, "denominator", &metric.denominator);
                    unused(&mut issues, "types", !metric.types.is_empty());
                    unused(&mut issues, "field", metric.field.is_some());
                    unused(&mut issues, "scale", metric.scale.is_some());
                    MetricKind::Ratio
                }
                MetricKindName::Mean => {
                    unused(&mut issues, "types", !metric.types.is_empty());
                    unused(&mut issues, "dims", !metric.dims.is_empty());
                    let find = |key: &str,
                                target: &Option<String>,
                                wanted: &[MetricKindName],
                                issues: &mut Vec<ConfigIssue>| {
                        let Some(target) = target else {
                            issues.push(issue(format!("{at}.{key}"), "is required for kind mean"));
                            return 0;
                        };
                        match self.metrics.iter().position(|other| &other.name == target) {
                            Some(index) if wanted.contains(&self.metrics[index].kind) => index,
                            _ => {
                                issues.push(issue(
                                    format!("{at}.{key}"),
                                    format!(
                                        "must name a metric of kind {}",
                                        wanted
                                            .iter()
                                            .map(|kind| kind.to_string())
                                            .collect::<Vec<_>>()
                                            .join(" or ")
                                    ),
                                ));
                                0
                            }
                        }
                    };
                    let sum_metric = find(
                        "sum_metric",
                        &metric.sum_metric,
                        &[MetricKindName::Sum],
                        &mut issues,
                    );
                    let count_metric = find(
                        "count_metric",
                        &metric.count_metric,
                        &[MetricKindName::Count, MetricKindName::Sum],
                        &mut issues,
                    );
                    let scale = metric.scale.unwrap_or(1);
                    if scale == 0 {
                        issues.push(issue(format!("{at}.scale"), "must be at least 1"));
                    }
                    MetricKind::Mean {
                        sum_metric,
                        count_metric,
                        scale,
                    }
                }
            };
            if metric.dims.len() > self.ingest.dims_per_event_max {
                issues.push(issue(
                    format!("{at}.dims"),
                    "more dims than an event may carry",
                ));
            }
            let mut seen_dims = HashSet::new();
            for (d, dim) in metric.dims.iter().enumerate() {
                if dim.is_empty()
                    || dim.len() > self.ingest.dim_key_bytes_max
                    || !seen_dims.insert(dim)
                {
                    issues.push(issue(
                        format!("{at}.dims[{d}]"),
                        "must be a distinct key of at most dim_key_bytes_max bytes",
                    ));
                }
            }
            let types = if metric.kind == MetricKindName::Ratio {
                metric.denominator.clone()
            } else {
                metric.types.clone()
            };
            defs.push(MetricDef {
                name: metric.name.clone(),
                kind,
                types,
                numerator: metric.numerator.clone(),
                dims: metric.dims.clone(),
            });
        }
        if issues.is_empty() {
            Ok(Catalogue::new(defs))
        } else {
            Err(issues)
        }
    }
}
