//! `tally-loadtest`: seeded load scenarios (files in `loadtest/scenarios/`)
//! against a Tally node or a Redis 7 server that this program starts itself,
//! each a separate process on loopback with its own data directory.
//!
//! - `run`: one scenario against one target. Reports events/s acknowledged,
//!   ack latency p50/p99/p99.9, event acknowledged → WebSocket update latency
//!   when the scenario has clients, the server's CPU and resident memory, and
//!   fails unless the target's windows equal what was acknowledged.
//! - `compare`: the same scenario against Tally and Redis side by side: both
//!   closed loop at their most, then both at one fixed rate (half the slower's
//!   most) for latency; prints the ratios.
//! - `enrich`: a scenario with an enrichment, closed loop, in turns with the
//!   node looking the dims up and with the producer sending them itself;
//!   prints each turn and the ratio of the medians.
//! - `idle`: many configured tenants and no traffic: time to ready, resident
//!   memory and cpu, at first start and after a restart.
//! - `soak`: one scenario minute after minute, a table per minute, then the
//!   end checks, `kill -9` and restart, re-sent ids, a graceful stop.

mod idle;
mod redis_target;
mod run;
mod scenario;
mod soak;
mod tally_target;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::redis_target::RedisTarget;
use crate::run::{drive, now_ms, Report, Target};
use crate::scenario::{expectations, Scenario};
use crate::tally_target::TallyTarget;

#[derive(Parser)]
#[command(name = "tally-loadtest")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum TargetKind {
    Tally,
    Redis,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// The scenario file.
    #[arg(long)]
    scenario: PathBuf,
    /// The tally binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/tally")]
    tally: String,
    /// The node config; the scenario's tenants are appended to it. Redis
    /// keeps the same metric catalogue.
    #[arg(long, default_value = "config/default.toml")]
    config: String,
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Overrides the scenario's duration, in seconds.
    #[arg(long)]
    duration_s: Option<u64>,
    /// Overrides the scenario's rate, in events per second (0 = most).
    #[arg(long)]
    rate: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// One scenario against one target.
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "tally")]
        target: TargetKind,
    },
    /// The scenario against Tally and Redis 7, side by side.
    Compare {
        #[command(flatten)]
        common: Common,
    },
    /// A scenario with an `[enrichment]`, in turns: the node enriches, the
    /// producer enriches; medians and their ratio.
    Enrich {
        #[command(flatten)]
        common: Common,
        /// Turns of each.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// One scenario for some minutes, a table per minute, then end checks.
    Soak {
        #[arg(long, default_value = "loadtest/scenarios/one-tenant-default.toml")]
        scenario: PathBuf,
        #[arg(long, default_value_t = 10)]
        minutes: usize,
        #[arg(long, default_value = "target/release/tally")]
        tally: String,
        #[arg(long, default_value = "config/default.toml")]
        config: String,
    },
    /// Many configured tenants and no traffic.
    Idle {
        /// Tenants appended to the config.
        #[arg(long, default_value_t = 10_000)]
        tenants: usize,
        /// Seconds to wait after ready before the memory and cpu are read.
        #[arg(long, default_value_t = 5)]
        settle_s: u64,
        #[arg(long, default_value = "target/release/tally")]
        tally: String,
        #[arg(long, default_value = "config/default.toml")]
        config: String,
    },
}

fn load(common: &Common) -> Result<(Scenario, Vec<tally::config::MetricConfig>), String> {
    let mut scenario = Scenario::load(&common.scenario)?;
    if let Some(duration_s) = common.duration_s {
        scenario.duration_s = duration_s;
    }
    if let Some(rate) = common.rate {
        scenario.rate_events_per_s = rate;
    }
    scenario.check()?;
    let text = std::fs::read_to_string(&common.config)
        .map_err(|e| format!("cannot read {}: {e}", common.config))?;
    let config = tally::config::Config::parse(&text, Vec::new())
        .map_err(|issues| format!("{} is invalid: {issues:?}", common.config))?;
    Ok((scenario, config.metrics))
}

/// Runs the scenario against one target, checks its windows, and reports.
async fn run_one(
    common: &Common,
    scenario: &Scenario,
    metrics: &[tally::config::MetricConfig],
    kind: TargetKind,
) -> Result<Report, String> {
    let plan = expectations(metrics, scenario);
    let watched: Vec<usize> = plan
        .iter()
        .find(|(metric, _)| metric.name == "orders")
        .map(|(_, expectation)| expectation.kinds())
        .unwrap_or_default();
    let target = match kind {
        TargetKind::Tally => {
            Target::Tally(TallyTarget::start(&common.tally, &common.config, scenario).await?)
        }
        TargetKind::Redis => {
            Target::Redis(RedisTarget::start(&common.redis_server, scenario, metrics).await?)
        }
    };
    eprintln!(
        "[{}] {} tenants, {} connections, batches of {}, {} for {} s",
        target.name(),
        scenario.tenants,
        scenario.connections,
        scenario.batch_events,
        match scenario.rate_events_per_s {
            0 => "closed loop at the most it acks".to_string(),
            rate => format!("{rate} events/s"),
        },
        scenario.duration_s
    );
    let (report, target) = drive(target, scenario.clone(), watched.clone()).await?;
    report.print();
    let checked = match &target {
        Target::Tally(tally) => {
            let (resident, accepted, others) = tally.telemetry().await?;
            println!(
                "[tally] /metrics: {:.0} MiB resident, {accepted:.0} events accepted; {}",
                resident / (1024.0 * 1024.0),
                if others.is_empty() {
                    "no other outcome".to_string()
                } else {
                    others.join(", ")
                }
            );
            for line in tally.freshness().await? {
                println!("[tally] freshness of tenant 0, {line}");
            }
            let mut windows = vec!["15m"];
            // today is exact only when the run did not cross the tenants'
            // (UTC) midnight
            if report.first_s.div_euclid(86_400) == now_ms().div_euclid(86_400_000) {
                windows.push("today");
            }
            let checked = tally.check(scenario, &report.model, &windows).await;
            if checked.is_err() {
                match tally.orders_by_second(&report.model, &watched).await {
                    Ok(seconds) => {
                        for (second, node, sent) in seconds {
                            eprintln!("[tally] tenant 0 orders in second {second}: node {node}, sent {sent}");
                        }
                    }
                    Err(error) => eprintln!("[tally] {error}"),
                }
            }
            checked
        }
        Target::Redis(redis) => {
            redis
                .check(
                    scenario,
                    &report.model,
                    metrics,
                    report.first_s - 1,
                    report.last_s + 1,
                )
                .await
        }
    };
    match target {
        Target::Tally(tally) => tally.stop().await,
        Target::Redis(redis) => redis.stop().await,
    }
    match checked {
        Ok(figures) => {
            println!(
                "[{}] check: {figures} window figures equal what was acknowledged ({} events)",
                report.target,
                report.model.events()
            );
            Ok(report)
        }
        Err(differences) => {
            for difference in &differences {
                eprintln!("[{}] mismatch: {difference}", report.target);
            }
            Err(format!(
                "{} window figures differ from what was acknowledged ({} events)",
                differences.len(),
                report.model.events()
            ))
        }
    }
}

async fn compare(common: &Common) -> Result<(), String> {
    let (scenario, metrics) = load(common)?;
    let mut most = scenario.clone();
    most.rate_events_per_s = 0;
    most.ws_clients = 0;
    println!("== closed loop: the most each acknowledges ==");
    let tally_most = run_one(common, &most, &metrics, TargetKind::Tally).await?;
    let redis_most = run_one(common, &most, &metrics, TargetKind::Redis).await?;
    let slower = tally_most.events_per_s().min(redis_most.events_per_s());
    let mut paced = most.clone();
    paced.rate_events_per_s = ((slower / 2.0) as u64 / scenario.batch_events as u64).max(1)
        * scenario.batch_events as u64;
    println!(
        "== latency at one rate both sustain: {} events/s (half the slower's most) ==",
        paced.rate_events_per_s
    );
    let tally_paced = run_one(common, &paced, &metrics, TargetKind::Tally).await?;
    let redis_paced = run_one(common, &paced, &metrics, TargetKind::Redis).await?;
    let p99_ms = |report: &Report| report.ack_latency_us.value_at_quantile(0.99) as f64 / 1000.0;
    println!();
    println!("| | tally | redis 7 (appendfsync always) | tally / redis |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| events/s, closed loop (most acknowledged) | {:.0} | {:.0} | **{:.2}x** |",
        tally_most.events_per_s(),
        redis_most.events_per_s(),
        tally_most.events_per_s() / redis_most.events_per_s()
    );
    println!(
        "| ack p99 at {} events/s | {:.2} ms | {:.2} ms | {:.2} |",
        paced.rate_events_per_s,
        p99_ms(&tally_paced),
        p99_ms(&redis_paced),
        p99_ms(&tally_paced) / p99_ms(&redis_paced)
    );
    println!(
        "| server cpu, closed loop | {:.2} cores | {:.2} cores | |",
        tally_most.cpu_cores, redis_most.cpu_cores
    );
    println!(
        "| server resident memory, closed loop | {:.0} MiB | {:.0} MiB | |",
        tally_most.resident_mib, redis_most.resident_mib
    );
    println!(
        "| load generator cpu, closed loop | {:.2} cores | {:.2} cores | |",
        tally_most.generator_cpu_cores, redis_most.generator_cpu_cores
    );
    println!();
    println!(
        "ratio of events/s (tally / redis): {:.2}",
        tally_most.events_per_s() / redis_most.events_per_s()
    );
    println!(
        "ratio of ack p99 at {} events/s (redis / tally): {:.2}",
        paced.rate_events_per_s,
        p99_ms(&redis_paced) / p99_ms(&tally_paced)
    );
    Ok(())
}

async fn enrich(common: &Common, rounds: usize) -> Result<(), String> {
    let (scenario, metrics) = load(common)?;
    if scenario.enrichment.is_none() {
        return Err("the scenario has no [enrichment]".into());
    }
    let with = |scenario: &Scenario, producer: bool| {
        let mut scenario = scenario.clone();
        if let Some(enrichment) = scenario.enrichment.as_mut() {
            enrichment.by_producer = producer;
        }
        scenario
    };
    let mut most = scenario.clone();
    most.rate_events_per_s = 0;
    most.ws_clients = 0;
    let mut by_node = Vec::new();
    let mut by_producer = Vec::new();
    for round in 1..=rounds.max(1) {
        for producer in [false, true] {
            let who = if producer { "producer" } else { "node" };
            println!("== closed loop, turn {round}: the {who} enriches ==");
            let report =
                run_one(common, &with(&most, producer), &metrics, TargetKind::Tally).await?;
            if producer {
                by_producer.push(report.events_per_s());
            } else {
                by_node.push(report.events_per_s());
            }
        }
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let node_most = median(&mut by_node);
    let producer_most = median(&mut by_producer);
    // then one rate both sustain: what the lookups cost there is cpu
    let mut paced = most.clone();
    paced.rate_events_per_s =
        ((node_most.min(producer_most) / 2.0) as u64 / scenario.batch_events as u64).max(1)
            * scenario.batch_events as u64;
    println!(
        "== {} events/s, the node enriches ==",
        paced.rate_events_per_s
    );
    let node_paced = run_one(common, &with(&paced, false), &metrics, TargetKind::Tally).await?;
    println!(
        "== {} events/s, the producer enriches ==",
        paced.rate_events_per_s
    );
    let producer_paced = run_one(common, &with(&paced, true), &metrics, TargetKind::Tally).await?;
    let p99_ms = |report: &Report| report.ack_latency_us.value_at_quantile(0.99) as f64 / 1000.0;
    println!();
    println!("| | the node enriches | the producer sends the dims | node / producer |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| events/s, closed loop (median of {}) | {node_most:.0} | {producer_most:.0} | **{:.3}** |",
        by_node.len(),
        node_most / producer_most
    );
    println!(
        "| events/s at {} offered | {:.0} | {:.0} | {:.3} |",
        paced.rate_events_per_s,
        node_paced.events_per_s(),
        producer_paced.events_per_s(),
        node_paced.events_per_s() / producer_paced.events_per_s()
    );
    println!(
        "| ack p99 at {} events/s | {:.2} ms | {:.2} ms | {:.2} |",
        paced.rate_events_per_s,
        p99_ms(&node_paced),
        p99_ms(&producer_paced),
        p99_ms(&node_paced) / p99_ms(&producer_paced)
    );
    println!(
        "| server cpu at {} events/s | {:.2} cores | {:.2} cores | {:.3} |",
        paced.rate_events_per_s,
        node_paced.cpu_cores,
        producer_paced.cpu_cores,
        node_paced.cpu_cores / producer_paced.cpu_cores
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run { common, target } => match load(&common) {
            Ok((scenario, metrics)) => run_one(&common, &scenario, &metrics, target)
                .await
                .map(|_| ()),
            Err(error) => Err(error),
        },
        Command::Compare { common } => compare(&common).await,
        Command::Enrich { common, rounds } => enrich(&common, rounds).await,
        Command::Soak {
            scenario,
            minutes,
            tally,
            config,
        } => soak::soak(&tally, &config, &scenario, minutes).await,
        Command::Idle {
            tenants,
            settle_s,
            tally,
            config,
        } => idle::idle(&tally, &config, tenants, settle_s).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tally-loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}
