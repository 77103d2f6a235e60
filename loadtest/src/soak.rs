//! `soak`: one scenario (one tenant at full rate, on the shipped defaults) for
//! a number of minutes, a table per minute (events/s, ack p99, the node's
//! resident memory, the data directory's size, and from the node's telemetry
//! its snapshots and log flushes in that minute), then the end checks: every
//! window equals what was acknowledged; `kill -9` and the time to ready again;
//! the windows again; a batch of the first minute sent again must come back
//! all `duplicate`; a graceful stop and its time.

use std::path::Path;

use crate::run::{drive, Target};
use crate::scenario::{EventStream, Model, Scenario};
use crate::tally_target::TallyTarget;

/// Bytes of the files under `path`.
fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        match entry.metadata() {
            Ok(meta) if meta.is_dir() => total += dir_bytes(&entry.path()),
            Ok(meta) => total += meta.len(),
            Err(_) => {}
        }
    }
    total
}

pub async fn soak(
    tally: &str,
    config: &str,
    scenario_path: &Path,
    minutes: usize,
) -> Result<(), String> {
    let mut scenario = Scenario::load(scenario_path)?;
    scenario.duration_s = 60;
    scenario.check()?;
    let mut node = TallyTarget::start(tally, config, &scenario).await?;
    let mut total = Model::new(&scenario);
    println!(
        "| minute | events/s | ack p99 ms | retries | resident MiB | data dir MiB | snapshots | snapshot ms | last snapshot MiB | log flush ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut work = node.storage_work().await?;
    for minute in 0..minutes {
        scenario.stream_offset = minute * scenario.connections;
        let (report, target) = drive(Target::Tally(node), scenario.clone(), Vec::new()).await?;
        node = match target {
            Target::Tally(node) => node,
            Target::Redis(_) => return Err("the soak drives tally".into()),
        };
        total.merge(&report.model);
        let now = node.storage_work().await?;
        let (snapshots, snapshot_ms, flush_ms) = now.since(&work);
        work = now;
        println!(
            "| {} | {:.0} | {:.1} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} |",
            minute + 1,
            report.events_per_s(),
            report.ack_latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            report.retries,
            report.resident_mib,
            dir_bytes(&node.data_dir) as f64 / (1024.0 * 1024.0),
            snapshots,
            snapshot_ms,
            now.snapshot_bytes / (1024.0 * 1024.0),
            flush_ms,
        );
    }
    let windows = ["15m", "today"];
    let compared = node
        .check(&scenario, &total, &windows)
        .await
        .map_err(|d| d.join("\n"))?;
    println!("[soak] windows equal what was acknowledged ({compared} figures)");
    let ready_s = node.kill_and_restart().await?;
    println!("[soak] kill -9, then ready again in {ready_s:.2} s");
    let compared = node
        .check(&scenario, &total, &windows)
        .await
        .map_err(|d| d.join("\n"))?;
    println!("[soak] after the restart, windows equal what was acknowledged ({compared} figures)");
    // the first batch of the first minute's first connection, sent again
    scenario.stream_offset = 0;
    let first = EventStream::new(&scenario, 0).next_batch(&scenario, crate::run::now_ms());
    let (accepted, duplicates) = node.post_once(&first).await?;
    println!(
        "[soak] a batch of the first minute sent again: {duplicates} duplicate, {accepted} accepted"
    );
    if accepted != 0 || duplicates != first.events.len() as u64 {
        return Err("a re-sent event of the first minute was not a duplicate".into());
    }
    let stop_s = node.stop_gracefully().await?;
    println!("[soak] graceful stop in {stop_s:.2} s");
    Ok(())
}
