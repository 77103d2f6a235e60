//! A full disk, on a real size-limited filesystem: a tmpfs of 64 MiB mounted
//! for the test (it runs as root, as `scripts/test` and CI do), with the real
//! `tally` binary on it.
//!
//! - Below `storage.disk_free_bytes_min`, ingest answers 507 with a reason
//!   before writing anything, reads keep working with exact values, ingest
//!   resumes by itself when space returns, and after `kill -9` every
//!   acknowledged event is there.
//! - With the check off, the disk fills under a flush: the node exits (status
//!   3) instead of hanging in the store's shutdown, releases the store, and a
//!   restart once space returns recovers every acknowledged event.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

mod common;

use common::{free_port, wait_until_ready};

const FS_BYTES: u64 = 64 << 20;
const RESERVE_BYTES: u64 = 16 << 20;

/// A tmpfs of `FS_BYTES` under a temporary directory, unmounted on drop.
struct SmallFilesystem {
    mount_point: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFilesystem {
    fn mount() -> SmallFilesystem {
        let dir = tempfile::tempdir().unwrap();
        let mount_point = dir.path().join("fs");
        std::fs::create_dir(&mount_point).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_BYTES}"), "tmpfs"])
            .arg(&mount_point)
            .status()
            .expect("mount(8) runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (scripts/test and CI run as root)"
        );
        SmallFilesystem {
            mount_point,
            _dir: dir,
        }
    }

    fn free_bytes(&self) -> u64 {
        tally::storage::disk_free_bytes(&self.mount_point).unwrap()
    }

    /// Takes space until `leave_bytes` are free, in a file it returns.
    fn fill_leaving(&self, leave_bytes: u64) -> PathBuf {
        let path = self.mount_point.join("filler");
        let take = self.free_bytes().saturating_sub(leave_bytes);
        std::fs::write(&path, vec![7u8; take as usize]).unwrap();
        path
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
    }
}

fn spawn_node(data_dir: &Path, port: u16, reserve_bytes: u64, log: &Path) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TALLY_") {
            command.env_remove(name);
        }
    }
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TALLY_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("TALLY_STORAGE__DATA_DIR", data_dir)
        .env("TALLY_STORAGE__CACHE_BYTES", (8u64 << 20).to_string())
        .env(
            "TALLY_STORAGE__DISK_FREE_BYTES_MIN",
            reserve_bytes.to_string(),
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A batch of 1 000 orders with ids `{prefix}-{batch}-{n}` (long ids, so the
/// log grows quickly).
fn batch_body(prefix: &str, batch: u64) -> String {
    let ts_ms = wall_ms();
    let padding = "x".repeat(100);
    (0..1000)
        .map(|n| {
            json!({"id": format!("{prefix}-{batch}-{n}-{padding}"), "type": "order.completed",
                   "ts": ts_ms, "amount": 100, "currency": "USD"})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn post(client: &reqwest::Client, base: &str, body: String) -> (u16, Value) {
    let response = client
        .post(format!("{base}/v1/events"))
        .bearer_auth("demo-key")
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn orders_today(client: &reqwest::Client, base: &str) -> u64 {
    let response = client
        .get(format!("{base}/v1/metrics/orders?window=today"))
        .bearer_auth("demo-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    body["windows"]["today"]["value"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_reserve_ingest_is_507_reads_go_on_and_ingest_resumes() {
    let fs = SmallFilesystem::mount();
    let data_dir = fs.mount_point.join("data");
    let log = fs._dir.path().join("tally.log");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut child = spawn_node(&data_dir, port, RESERVE_BYTES, &log);
    wait_until_ready(&client, &mut child, &base, &log).await;
    // about 6 MiB above the reserve: a few batches fit, then 507
    let filler = fs.fill_leaving(RESERVE_BYTES + (6 << 20));
    let mut acknowledged = 0u64;
    let mut refused = None;
    for batch in 0..200 {
        let (status, body) = post(&client, &base, batch_body("a", batch)).await;
        match status {
            200 => acknowledged += body["accepted"].as_u64().unwrap(),
            507 => {
                refused = Some(body);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let refused = refused.expect("the reserve was reached");
    assert!(acknowledged > 0);
    assert_eq!(refused["error"], "insufficient_storage");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("storage.disk_free_bytes_min (16777216)"),
        "{message}"
    );
    // reads go on, with exactly what was acknowledged
    assert_eq!(orders_today(&client, &base).await, acknowledged);
    // a refused request wrote nothing: the same batch is refused again
    let (status, _) = post(&client, &base, batch_body("a", 9_999)).await;
    assert_eq!(status, 507);
    assert_eq!(orders_today(&client, &base).await, acknowledged);

    // space returns: ingest resumes by itself
    std::fs::remove_file(filler).unwrap();
    let (status, body) = post(&client, &base, batch_body("b", 0)).await;
    assert_eq!(status, 200, "{body}");
    acknowledged += body["accepted"].as_u64().unwrap();
    assert_eq!(orders_today(&client, &base).await, acknowledged);

    // nothing acknowledged is lost
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn_node(&data_dir, port, RESERVE_BYTES, &log);
    wait_until_ready(&client, &mut child, &base, &log).await;
    assert_eq!(orders_today(&client, &base).await, acknowledged);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_on_a_full_disk_ends_the_process_and_a_restart_recovers() {
    let fs = SmallFilesystem::mount();
    let data_dir = fs.mount_point.join("data");
    let log = fs._dir.path().join("tally.log");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // the reserve is off: the disk fills under a write or a flush
    let mut child = spawn_node(&data_dir, port, 0, &log);
    wait_until_ready(&client, &mut child, &base, &log).await;
    let filler = fs.fill_leaving(4 << 20);
    let mut acknowledged = 0u64;
    let mut failed = false;
    for batch in 0..400 {
        match client
            .post(format!("{base}/v1/events"))
            .bearer_auth("demo-key")
            .header("content-type", "application/x-ndjson")
            .body(batch_body("c", batch))
            .send()
            .await
        {
            Ok(response) if response.status().as_u16() == 200 => {
                let body: Value = response.json().await.unwrap();
                acknowledged += body["accepted"].as_u64().unwrap();
            }
            // a 503, or the connection gone: storage failed
            _ => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the disk never filled");
    assert!(acknowledged > 0);
    // the process ends by itself (it used to hang in the store's shutdown)
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "tally did not exit after storage failed: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        status.code(),
        Some(3),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // space returns; a restart (the store's lock released) recovers everything
    std::fs::remove_file(filler).unwrap();
    let mut child = spawn_node(&data_dir, port, 0, &log);
    wait_until_ready(&client, &mut child, &base, &log).await;
    let counted = orders_today(&client, &base).await;
    // an unacknowledged batch may have reached the disk: at least what was acked
    assert!(
        counted >= acknowledged && counted <= acknowledged + 1000,
        "counted {counted}, acknowledged {acknowledged}"
    );
    assert_eq!(counted % 1000, 0);
    child.kill().unwrap();
    child.wait().unwrap();
}
