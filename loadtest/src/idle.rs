//! `idle`: many configured tenants and no traffic. Starts the release node with
//! `--tenants` tenants appended to the config, reports how long it took to be
//! ready and its resident memory once ready and after a settling pause, then
//! stops it with SIGTERM, starts it again on the same data (recovery of every
//! tenant) and reports the same. Memory that follows traffic, not the number
//! of tenants, is what this measures.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::run::{cpu_seconds, resident_bytes};
use crate::tally_target::free_port;

#[derive(Debug)]
struct Start {
    ready_s: f64,
    resident_ready_mib: f64,
    resident_settled_mib: f64,
    cpu_cores_settled: f64,
}

async fn start_once(
    tally: &str,
    config_path: &std::path::Path,
    data_dir: &std::path::Path,
    settle_s: u64,
) -> Result<Start, String> {
    let port = free_port()?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(tally)
        .args(["serve", "--config"])
        .arg(config_path)
        .env("TALLY_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("TALLY_STORAGE__DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {tally} (cargo build --release first): {e}"))?;
    let pid = child.id().ok_or("the node has no pid")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let ready_s = loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the node exited before it was ready ({status})"));
        }
        if let Ok(response) = http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
        {
            if response.status().is_success() {
                break started.elapsed().as_secs_f64();
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err("the node was not ready within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let resident_ready_mib = resident_bytes(pid).unwrap_or(0.0) / (1024.0 * 1024.0);
    let cpu_before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(settle_s)).await;
    let cpu_cores_settled = (cpu_seconds(pid) - cpu_before) / settle_s.max(1) as f64;
    let resident_settled_mib = resident_bytes(pid).unwrap_or(0.0) / (1024.0 * 1024.0);
    // SIGTERM: a graceful stop with its final snapshot
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    if !stopped.success() {
        return Err("kill -TERM failed".into());
    }
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .map_err(|_| "the node did not stop within 120 s".to_string())?
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("the node stopped with {status}"));
    }
    Ok(Start {
        ready_s,
        resident_ready_mib,
        resident_settled_mib,
        cpu_cores_settled,
    })
}

pub async fn idle(tally: &str, config: &str, tenants: usize, settle_s: u64) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let mut text =
        std::fs::read_to_string(config).map_err(|e| format!("cannot read {config}: {e}"))?;
    for tenant in 0..tenants {
        write!(
            text,
            "\n[[tenants]]\nid = \"idle-{tenant}\"\napi_keys = [\"idle-key-{tenant}\"]\ncurrency = \"USD\"\n"
        )
        .map_err(|e| e.to_string())?;
    }
    let config_path = dir.path().join("tally.toml");
    std::fs::write(&config_path, &text).map_err(|e| format!("cannot write the config: {e}"))?;
    tally::config::Config::parse(&text, Vec::new())
        .map_err(|issues| format!("the node config is invalid: {issues:?}"))?;
    let data_dir = dir.path().join("data");
    println!("[idle] {tenants} tenants (and those of {config}), no traffic, {settle_s} s settling");
    for run in ["first start", "restart"] {
        let start = start_once(tally, &config_path, &data_dir, settle_s).await?;
        println!(
            "[idle] {run}: ready in {:.2} s; resident {:.0} MiB when ready, {:.0} MiB after {settle_s} s \
             ({:.1} KiB a tenant); {:.3} cores while idle",
            start.ready_s,
            start.resident_ready_mib,
            start.resident_settled_mib,
            start.resident_settled_mib * 1024.0 / tenants.max(1) as f64,
            start.cpu_cores_settled,
        );
    }
    Ok(())
}
