//! Durability against a real node and real sled files: restarts keep every
//! window, de-duplication and the quarantine; a damaged snapshot or a torn last
//! log record is reported and skipped; a storage failure is 503, not ready, and
//! fatal. (The kill -9 cycles are in tests/crash.rs, against the binary.)

mod common;

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{json, Value};

use common::{order, start_node, start_node_in, TestNode, T0_MS};
use tally::storage::envelope::{decode, encode, RecordKind};
use tally::storage::snapshot::{
    history_key, manifest_key, part_key, snapshot_ids, SnapshotManifest,
};
use tally::storage::{key_lsn, read_value, Op, SledStore, Space, Store};

async fn windows(node: &TestNode) -> Value {
    let mut metrics = node.metrics("demo-key").await;
    metrics.as_object_mut().unwrap().remove("at");
    metrics
}

fn with_store<T>(dir: &std::path::Path, work: impl FnOnce(&SledStore) -> T) -> T {
    let store = SledStore::open(dir).unwrap();
    let result = work(&store);
    store.flush().unwrap();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_replays_nothing_and_keeps_everything() {
    let node = start_node(|_| {}).await;
    let events = [
        order("o-1", 1250, T0_MS - 20_000),
        order("o-2", 800, T0_MS - 400_000),
        json!({"id": "c-1", "type": "checkout.completed", "value": 212}),
        json!({"id": "p-1", "type": "payment.failed", "dims": {"method": "card"}}),
    ];
    assert_eq!(node.post("demo-key", &events).await.body["accepted"], 4);
    let quarantined = node
        .post_raw(Some("demo-key"), "application/x-ndjson", "not json")
        .await;
    assert_eq!(quarantined.body["quarantined"], 1);
    let before = windows(&node).await;
    let stopped = node.stop_keeping_data().await;

    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(
        node.recovery().records_replayed,
        0,
        "the final snapshot covers the log"
    );
    assert!(node.recovery().snapshot_id.is_some());
    assert_eq!(windows(&node).await, before);
    // de-duplication survived: the same events are duplicates
    assert_eq!(node.post("demo-key", &events).await.body["duplicates"], 4);
    let listed = node.get(Some("demo-key"), "/v1/quarantine").await;
    assert_eq!(listed.body["events"][0]["raw"], "not json");
    assert_eq!(listed.body["events"][0]["qid"], 1);
    // new quarantined events continue the qids
    let more = node
        .post_raw(Some("demo-key"), "application/x-ndjson", "still not json")
        .await;
    assert_eq!(more.body["errors"][0]["qid"], 2);
    // and the windows still slide from where they were
    node.clock.set_ms(T0_MS + 30_000);
    let gmv = node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["30s"].clone();
    assert_eq!(
        gmv,
        json!({"value": 0, "count": 0, "prev": 1250, "prev_count": 1})
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_final_snapshot_the_log_is_replayed() {
    let node = start_node(|_| {}).await;
    for batch in 0..5 {
        let events: Vec<Value> = (0..10)
            .map(|i| order(&format!("b{batch}-{i}"), 100 + i, T0_MS - i * 1000))
            .collect();
        assert_eq!(node.post("demo-key", &events).await.body["accepted"], 10);
    }
    let before = windows(&node).await;
    let stopped = node.halt_keeping_data().await;

    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(node.recovery().snapshot_id, None);
    assert_eq!(node.recovery().records_replayed, 5);
    assert_eq!(windows(&node).await, before);
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["orders"]["windows"]["today"]["value"],
        50
    );
    let again = node.post("demo-key", &[order("b0-0", 100, T0_MS)]).await;
    assert_eq!(again.body["duplicates"], 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_newest_snapshot_falls_back_to_the_one_before() {
    // snapshot 1 holds the first batch; snapshot 2 both
    let node = start_node(|_| {}).await;
    node.post("demo-key", &[order("a", 100, T0_MS)]).await;
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    node.post("demo-key", &[order("b", 20, T0_MS)]).await;
    let before = windows(&node).await;
    assert_eq!(before["metrics"]["gmv"]["windows"]["today"]["value"], 120);
    let stopped = node.stop_keeping_data().await;

    let newest = with_store(stopped.data.path(), |store| {
        let ids = snapshot_ids(store).unwrap();
        assert_eq!(ids, vec![2, 1]);
        // flip one byte in the middle of the newest snapshot's demo part
        damage_part(store, ids[0], "demo");
        ids[0]
    });

    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    let report = node.recovery().clone();
    assert_eq!(report.snapshot_id, Some(1));
    assert_eq!(report.snapshots_skipped.len(), 1);
    assert_eq!(report.snapshots_skipped[0].0, newest);
    assert!(
        report.snapshots_skipped[0].1.contains("checksum"),
        "{:?}",
        report.snapshots_skipped
    );
    assert_eq!(
        report.records_replayed, 1,
        "the batch after snapshot 1 comes from the log"
    );
    assert_eq!(windows(&node).await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_last_log_record_is_skipped_and_the_rest_served() {
    let node = start_node(|_| {}).await;
    node.post(
        "demo-key",
        &[order("a", 100, T0_MS), order("b", 200, T0_MS)],
    )
    .await;
    node.post("demo-key", &[order("c", 4000, T0_MS)]).await;
    let stopped = node.halt_keeping_data().await;

    let last = with_store(stopped.data.path(), |store| {
        let last_key = store.last_key(Space::Wal).unwrap().unwrap();
        let mut value = Vec::new();
        store
            .scan(Space::Wal, &last_key, &mut |_, bytes| {
                value = bytes.to_vec();
                false
            })
            .unwrap();
        value.truncate(value.len() - 7);
        store
            .apply(&[Op::Put {
                space: Space::Wal,
                key: last_key.clone(),
                value,
            }])
            .unwrap();
        key_lsn(&last_key).unwrap()
    });

    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    let report = node.recovery().clone();
    assert_eq!(report.records_replayed, 1);
    assert_eq!(report.records_skipped.len(), 1);
    assert_eq!(report.records_skipped[0].0, last);
    let gmv = node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"].clone();
    assert_eq!(gmv, json!({"value": 300, "count": 2}));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_prune_the_log_and_older_snapshots() {
    let node = start_node(|config| config.storage.snapshots_kept = 2).await;
    let running = node.running.as_ref().unwrap();
    for round in 0..4 {
        node.post("demo-key", &[order(&format!("r{round}"), 10, T0_MS)])
            .await;
        running.node.take_snapshot().await.unwrap();
    }
    let store = &running.node.store;
    assert_eq!(snapshot_ids(&**store).unwrap(), vec![4, 3]);
    // the log is kept back to snapshot 3's position: only round 3's record
    let mut lsns = Vec::new();
    store
        .scan(Space::Wal, &[], &mut |key, _| {
            lsns.push(key_lsn(key).unwrap());
            true
        })
        .unwrap();
    assert_eq!(lsns, vec![4]);
    let mut manifest = None;
    store
        .scan(Space::Snapshot, &manifest_key(3), &mut |_, value| {
            manifest = Some(
                decode::<SnapshotManifest>(value, RecordKind::SnapshotManifest, 1 << 20).unwrap(),
            );
            false
        })
        .unwrap();
    assert_eq!(manifest.unwrap().min_position_lsn, 3);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_larger_than_one_commit_removes_every_covered_record() {
    // the node commits a prune in pieces: this one takes two
    let records = tally::node::PRUNE_OPS_PER_COMMIT + 100;
    let node = start_node(|config| config.storage.snapshots_kept = 1).await;
    let running = node.running.as_ref().unwrap();
    for batch in 0..records {
        node.post("demo-key", &[order(&format!("p{batch}"), 1, T0_MS)])
            .await;
    }
    let wal_records = |store: &dyn Store| {
        let mut records = 0;
        store
            .scan(Space::Wal, &[], &mut |_, _| {
                records += 1;
                true
            })
            .unwrap();
        records
    };
    assert_eq!(wal_records(&*running.node.store), records);
    running.node.take_snapshot().await.unwrap();
    assert_eq!(wal_records(&*running.node.store), 0);
    let before = windows(&node).await;
    assert_eq!(
        before["metrics"]["gmv"]["windows"]["today"]["value"],
        records as u64
    );
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(node.recovery().records_replayed, 0);
    assert_eq!(windows(&node).await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_is_503_not_ready_and_fatal() {
    let data = tempfile::tempdir().unwrap();
    let faulty = Arc::new(tally::storage::FaultyStore::new(Arc::new(
        SledStore::open(data.path()).unwrap(),
    )));
    let mut config = common::test_config();
    config.storage.data_dir = data.path().to_path_buf();
    let clock = tally::clock::ManualClock::new(T0_MS);
    let running = tally::app::start_with_store(config, Arc::new(clock), faulty.clone())
        .await
        .unwrap();
    let base = format!("http://{}", running.local_addr);
    let client = reqwest::Client::new();
    let post = |body: String| {
        client
            .post(format!("{base}/v1/events"))
            .bearer_auth("demo-key")
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
    };
    assert_eq!(
        post(order("ok", 1, T0_MS).to_string())
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let mut fatal = running.fatal();
    faulty.fail_after_flushes(0);
    let failed = post(order("lost", 2, T0_MS).to_string()).await.unwrap();
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(failed.headers().contains_key("retry-after"));
    let body: Value = failed.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("storage failed"),
        "{body}"
    );
    fatal.changed().await.unwrap();
    assert!(fatal.borrow().is_some());
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // nothing after the failure is acknowledged either
    assert_eq!(
        post(order("later", 3, T0_MS).to_string())
            .await
            .unwrap()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    running.shutdown().await;
    drop(faulty); // sled locks its directory while open

    // What was acknowledged is there after a restart. The batch whose flush
    // failed may or may not have reached the disk (as with any failed commit);
    // its retry is then either accepted or a duplicate, never counted twice.
    let node = start_node_in(data, tally::clock::ManualClock::new(T0_MS), |_| {}).await;
    let today = node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"].clone();
    assert!(
        today == json!({"value": 1, "count": 1}) || today == json!({"value": 3, "count": 2}),
        "{today}"
    );
    let retried = node
        .post(
            "demo-key",
            &[order("lost", 2, T0_MS), order("later", 3, T0_MS)],
        )
        .await;
    assert_eq!(
        retried.body["accepted"].as_u64().unwrap() + retried.body["duplicates"].as_u64().unwrap(),
        2
    );
    let gmv = node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"].clone();
    assert_eq!(gmv, json!({"value": 6, "count": 3}));
    node.stop().await;
}

#[test]
fn an_unreadable_manifest_means_an_unfinished_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store
        .apply(&[Op::Put {
            space: Space::Snapshot,
            key: manifest_key(7),
            value: encode(RecordKind::WalBatch, &1u8).unwrap(),
        }])
        .unwrap();
    let result = tally::storage::snapshot::load_snapshot(&store, 7, 1 << 20).unwrap();
    assert!(result.unwrap_err().contains("manifest"));
    assert_eq!(
        tally::storage::snapshot::load_snapshot(&store, 8, 1 << 20)
            .unwrap()
            .unwrap_err(),
        "no manifest (the snapshot was not finished)"
    );
}

/// Flips a byte in the middle of a snapshot's part of `tenant`.
fn damage_part(store: &SledStore, id: u64, tenant: &str) {
    let key = part_key(id, tenant);
    let mut value = read_value(store, Space::Snapshot, &key)
        .unwrap()
        .expect("the snapshot has that part");
    let middle = value.len() / 2;
    value[middle] ^= 0xFF;
    store
        .apply(&[Op::Put {
            space: Space::Snapshot,
            key,
            value,
        }])
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_refuses_to_start_rather_than_lose_pruned_events() {
    let node = start_node(|_| {}).await;
    let running = node.running.as_ref().unwrap();
    for round in 0..3 {
        node.post("demo-key", &[order(&format!("r{round}"), 10, T0_MS)])
            .await;
        running.node.take_snapshot().await.unwrap();
    }
    let stopped = node.halt_keeping_data().await;
    // both kept snapshots damaged: the pruned log cannot make up for them
    with_store(stopped.data.path(), |store| {
        assert_eq!(snapshot_ids(store).unwrap(), vec![3, 2]);
        damage_part(store, 3, "demo");
        damage_part(store, 2, "demo");
    });
    let mut config = common::test_config();
    config.storage.data_dir = stopped.data.path().to_path_buf();
    let started = tally::app::start(config, Arc::new(stopped.clock.clone())).await;
    let error = started.err().expect("recovery must refuse").to_string();
    assert!(error.contains("refusing to start"), "{error}");
    assert!(error.contains("log is kept only after LSN 2"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_ids_are_never_reused_after_a_restart() {
    let node = start_node(|_| {}).await;
    assert_eq!(
        node.post_raw(Some("demo-key"), "application/x-ndjson", "bad")
            .await
            .body["errors"][0]["qid"],
        1
    );
    assert_eq!(
        node.call(reqwest::Method::DELETE, "demo-key", "/v1/quarantine/1")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    let reply = node
        .post_raw(Some("demo-key"), "application/x-ndjson", "also bad")
        .await;
    assert_eq!(reply.body["errors"][0]["qid"], 2);
    // the old qid stays gone: a repeated delete cannot hit the new event
    assert_eq!(
        node.call(reqwest::Method::DELETE, "demo-key", "/v1/quarantine/1")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_snapshots_do_not_count_as_kept() {
    let node = start_node(|config| config.storage.snapshots_kept = 2).await;
    let running = node.running.as_ref().unwrap();
    node.post("demo-key", &[order("a", 10, T0_MS)]).await;
    running.node.take_snapshot().await.unwrap(); // 1
    node.post("demo-key", &[order("b", 10, T0_MS)]).await;
    running.node.take_snapshot().await.unwrap(); // 2
    let stopped = node.halt_keeping_data().await;
    // snapshot 3 was being written when the node died: a part, no manifest
    with_store(stopped.data.path(), |store| {
        store
            .apply(&[Op::Put {
                space: Space::Snapshot,
                key: part_key(3, "demo"),
                value: b"partial".to_vec(),
            }])
            .unwrap();
    });
    let node = start_node_in(stopped.data, stopped.clock, |config| {
        config.storage.snapshots_kept = 2
    })
    .await;
    assert_eq!(node.recovery().snapshot_id, Some(2));
    assert_eq!(node.recovery().snapshots_skipped.len(), 1);
    let running = node.running.as_ref().unwrap();
    let report = running.node.take_snapshot().await.unwrap();
    assert_eq!(report.id, 4);
    // kept: the two newest complete snapshots, 4 and 2; the unfinished 3 goes
    assert_eq!(snapshot_ids(&*running.node.store).unwrap(), vec![4, 2]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_right_after_a_snapshot_are_replayed_on_top_of_it() {
    let node = start_node(|_| {}).await;
    let running = node.running.as_ref().unwrap();
    node.post("demo-key", &[order("before", 100, T0_MS)]).await;
    running.node.take_snapshot().await.unwrap();
    node.post("demo-key", &[order("after-1", 20, T0_MS)]).await;
    let acme = json!({"id": "a", "type": "order.completed", "amount": 7, "currency": "EUR"});
    node.post("acme-key", &[acme]).await;
    node.post("demo-key", &[order("after-2", 3, T0_MS)]).await;
    let stopped = node.halt_keeping_data().await;

    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(node.recovery().snapshot_id, Some(1));
    assert_eq!(node.recovery().records_replayed, 3);
    let gmv = node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"].clone();
    assert_eq!(gmv, json!({"value": 123, "count": 3}));
    let acme = node.metrics("acme-key").await["metrics"]["gmv"]["windows"]["today"].clone();
    assert_eq!(acme, json!({"value": 7, "count": 1}));
    node.stop().await;
}

/// A tenant that stops serving (its actor found a metric actor gone after a
/// flush, as `tests/defects.rs` drives it) makes the node not ready and
/// answers that tenant's requests 503 with the reason; other tenants serve on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_that_stopped_serving_is_not_ready_and_503_with_its_reason() {
    let node = start_node(|_| {}).await;
    assert_eq!(node.get(None, "/readyz").await.status, StatusCode::OK);
    let reason = "2 metric actor(s) stopped before applying a durable batch";
    node.running
        .as_ref()
        .unwrap()
        .node
        .tenant("demo")
        .unwrap()
        .health
        .fail(reason);
    let ready = node.get(None, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ready.body,
        json!({"status": "not_ready", "reason": format!("tenant demo is not serving: {reason}")})
    );
    let ingest = node.post("demo-key", &[order("a", 100, T0_MS)]).await;
    assert_eq!(ingest.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ingest.body["message"],
        format!("tenant demo is not serving: {reason}")
    );
    assert_eq!(ingest.retry_after.as_deref(), Some("1"));
    let read = node.get(Some("demo-key"), "/v1/metrics").await;
    assert_eq!(read.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        read.body["message"],
        format!("tenant demo is not serving: {reason}")
    );
    let acme =
        json!({"id": "b", "type": "order.completed", "ts": T0_MS, "amount": 5, "currency": "EUR"});
    assert_eq!(node.post("acme-key", &[acme]).await.body["accepted"], 1);
    assert_eq!(
        node.get(Some("acme-key"), "/v1/metrics/orders?window=today")
            .await
            .body["windows"]["today"]["value"],
        1
    );
    node.stop().await;
}

/// Posts `events` until every one has an outcome, waiting out `503` (the
/// table of ids in memory is full until a snapshot moves them into a run).
async fn post_until_answered(node: &TestNode, events: &[Value]) -> Value {
    for _ in 0..200 {
        let reply = node.post("demo-key", events).await;
        if reply.status == StatusCode::OK {
            return reply.body;
        }
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the batch was never taken");
}

/// Merges the tenant's runs until none are left to merge; its runs then.
async fn merge_all_runs(node: &TestNode) -> Vec<tally::domain::dedup::RunMeta> {
    let running = &node.running.as_ref().unwrap().node;
    while running.merge_runs_once().await.unwrap() {}
    running
        .tenant("demo")
        .unwrap()
        .actor
        .send(tally::actors::tenant::ListRuns)
        .await
        .unwrap()
}

/// De-dup runs, CI-sized: a table of 1 000 ids in memory, so that snapshots
/// move ids into runs on disk as they come (a tenant at half its table asks for
/// one); the ids in runs are still recognized, also after a graceful restart
/// and after a crash-like one, and the windows hold every event once. Runs
/// merge, and a crash between a merge and the next snapshot loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_spill_into_runs_survive_restarts_and_are_still_recognized() {
    let tweak = |config: &mut tally::config::Config| {
        config.ingest.dedup_table_bytes_max = 1_000 * 128;
        config.storage.snapshot_interval_s = 3_600;
    };
    let node = start_node(tweak).await;
    let events: Vec<Value> = (0..4_000)
        .map(|n| order(&format!("spill-{n}"), 10, T0_MS))
        .collect();
    let mut accepted = 0;
    for batch in events.chunks(400) {
        accepted += post_until_answered(&node, batch).await["accepted"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(accepted, 4_000);
    let runs_dir = node
        .running
        .as_ref()
        .unwrap()
        .node
        .config
        .storage
        .data_dir
        .join("dedup/demo");
    let run_files = std::fs::read_dir(&runs_dir).unwrap().count();
    assert!(
        run_files >= 2,
        "ids were moved into runs ({run_files} files)"
    );
    // every id is recognized, wherever it is kept
    for batch in events.chunks(1_000) {
        let reply = post_until_answered(&node, batch).await;
        assert_eq!(reply["duplicates"], 1_000, "{reply}");
    }
    // runs of one size tier merge into one; a crash before any snapshot lists
    // the merged run recovers from the one listing its inputs
    let merged = merge_all_runs(&node).await;
    assert!(
        merged.iter().any(|run| run.ids >= 1_000),
        "runs of about 500 ids merged: {merged:?}"
    );
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, tweak).await;
    for batch in events.chunks(1_000) {
        let reply = post_until_answered(&node, batch).await;
        assert_eq!(reply["duplicates"], 1_000, "{reply}");
    }
    let merged = merge_all_runs(&node).await;
    for batch in events.chunks(1_000) {
        let reply = post_until_answered(&node, batch).await;
        assert_eq!(reply["duplicates"], 1_000, "{reply}");
    }
    assert_eq!(
        merged.iter().map(|run| run.ids).sum::<u64>(),
        4_000,
        "each id in one run: {merged:?}"
    );
    let before = windows(&node).await;
    assert_eq!(
        before["metrics"]["orders"]["windows"]["today"]["value"],
        4_000
    );

    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, tweak).await;
    assert_eq!(windows(&node).await, before);
    for batch in events.chunks(1_000) {
        assert_eq!(post_until_answered(&node, batch).await["duplicates"], 1_000);
    }
    // new ids after the restart, then a crash-like stop: runs and log together
    let more: Vec<Value> = (0..600)
        .map(|n| order(&format!("later-{n}"), 10, T0_MS))
        .collect();
    assert_eq!(post_until_answered(&node, &more).await["accepted"], 600);
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, tweak).await;
    for batch in events.chunks(1_000).chain([&more[..]]) {
        let reply = post_until_answered(&node, batch).await;
        assert_eq!(reply["accepted"], 0, "{reply}");
    }
    assert_eq!(
        windows(&node).await["metrics"]["orders"]["windows"]["today"]["value"],
        4_600
    );
    node.stop().await;
}

/// Each history chunk's first second and the snapshot that wrote it, by
/// metric (the keys of `Space::History`).
fn history_chunks(store: &dyn Store) -> Vec<(String, i64, u64)> {
    let mut chunks = Vec::new();
    store
        .scan(Space::History, &[], &mut |key, _| {
            let written_by = u64::from_be_bytes(key[..8].try_into().unwrap());
            let (names, start) = key[8..].split_at(key.len() - 16);
            let mut names = names.split(|byte| *byte == 0);
            let (Some(b"demo"), Some(metric)) = (names.next(), names.next()) else {
                panic!("a history key holds its tenant and metric after its writer");
            };
            let start_s = (u64::from_be_bytes(start.try_into().unwrap()) ^ (1 << 63)) as i64;
            chunks.push((
                String::from_utf8_lossy(metric).into_owned(),
                start_s,
                written_by,
            ));
            true
        })
        .unwrap();
    chunks
}

/// The first second and writer of each history chunk of `gmv`, in key order
/// (by writer).
fn gmv_chunks(store: &dyn Store) -> Vec<(i64, u64)> {
    history_chunks(store)
        .into_iter()
        .filter(|chunk| chunk.0 == "gmv")
        .map(|(_, start_s, written_by)| (start_s, written_by))
        .collect()
}

/// The minutes of the orders the history tests post: three back, and now.
const OLD_MINUTE_S: i64 = (T0_MS - 180_000).div_euclid(60_000) * 60;
const NOW_MINUTE_S: i64 = T0_MS.div_euclid(60_000) * 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_write_only_the_history_that_changed() {
    let node = start_node(|config| config.storage.snapshots_kept = 2).await;
    let running = node.running.as_ref().unwrap();
    let store = Arc::clone(&running.node.store);
    let (old_s, now_s) = (OLD_MINUTE_S, NOW_MINUTE_S);
    node.post(
        "demo-key",
        &[order("a", 100, T0_MS - 180_000), order("b", 20, T0_MS)],
    )
    .await;
    running.node.take_snapshot().await.unwrap();
    assert_eq!(gmv_chunks(&*store), [(old_s, 1), (now_s, 1)]);

    // two more snapshots, each after an order of this minute: the minute three
    // back is listed again, never written again; snapshot 1 is pruned, and so
    // is its version of this minute
    for (round, id) in [("c", 2), ("d", 3)] {
        node.post("demo-key", &[order(round, 5, T0_MS)]).await;
        let report = running.node.take_snapshot().await.unwrap();
        assert_eq!(report.id, id);
    }
    assert_eq!(gmv_chunks(&*store), [(old_s, 1), (now_s, 2), (now_s, 3)]);

    // snapshot 4 with a chunk of its own gone: recovery falls back to 3 and
    // replays the order after it
    node.post("demo-key", &[order("e", 7, T0_MS)]).await;
    running.node.take_snapshot().await.unwrap();
    let before = windows(&node).await;
    assert_eq!(before["metrics"]["gmv"]["windows"]["today"]["value"], 137);
    // the store closes with the node
    drop(store);
    let stopped = node.halt_keeping_data().await;
    with_store(stopped.data.path(), |store| {
        let lost: Vec<Op> = history_chunks(store)
            .into_iter()
            .filter(|chunk| chunk.0 == "gmv" && chunk.2 == 4)
            .map(|(metric, start_s, written_by)| Op::Remove {
                space: Space::History,
                key: history_key(written_by, "demo", &metric, start_s),
            })
            .collect();
        assert_eq!(lost.len(), 1);
        store.apply(&lost).unwrap();
    });
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    let report = node.recovery().clone();
    assert_eq!(report.snapshot_id, Some(3));
    assert!(
        report.snapshots_skipped[0]
            .1
            .contains("history of metric gmv"),
        "{:?}",
        report.snapshots_skipped
    );
    assert_eq!(report.records_replayed, 1);
    assert_eq!(windows(&node).await, before);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_deletes_every_history_chunk_no_kept_snapshot_lists() {
    let node = start_node(|config| config.storage.snapshots_kept = 2).await;
    let running = node.running.as_ref().unwrap();
    let store = Arc::clone(&running.node.store);
    let (old_s, now_s) = (OLD_MINUTE_S, NOW_MINUTE_S);
    let gmv = || gmv_chunks(&*store);
    // (each list in key order: by the snapshot that wrote the chunk)
    node.post(
        "demo-key",
        &[order("a", 100, T0_MS - 180_000), order("b", 20, T0_MS)],
    )
    .await;
    running.node.take_snapshot().await.unwrap();
    assert_eq!(gmv(), [(old_s, 1), (now_s, 1)]);
    // a late order changes the old minute
    node.post("demo-key", &[order("c", 3, T0_MS - 180_000)])
        .await;
    running.node.take_snapshot().await.unwrap();
    assert_eq!(gmv(), [(old_s, 1), (now_s, 1), (old_s, 2)]);
    // snapshot 1 goes: its old minute is listed by no kept one, its minute
    // now still by snapshot 2
    node.post("demo-key", &[order("d", 4, T0_MS)]).await;
    running.node.take_snapshot().await.unwrap();
    assert_eq!(gmv(), [(now_s, 1), (old_s, 2), (now_s, 3)]);
    // snapshot 2 goes: the minute now that snapshot 1 wrote loses its last
    // listing with it
    running.node.take_snapshot().await.unwrap();
    assert_eq!(gmv(), [(old_s, 2), (now_s, 3)]);
    drop(store);
    node.stop().await;
}
