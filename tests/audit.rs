//! The audit trail (docs/audit.md) against a real node: reads over HTTP, a
//! live subscription and a scrape are recorded with their key id, tenant,
//! route, status and rows; ingest is not; a tenant reads only its own records;
//! a large read is flagged; a burst of 401s from one address is recorded and
//! counted; records survive a restart.

mod common;

use std::time::Duration;

use futures_util::SinkExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{order, start_node, start_node_in, TestNode, T0_MS};

fn key_id(kind: &str, key: &str) -> String {
    format!(
        "{kind}:{}",
        hex::encode(&Sha256::digest(key.as_bytes())[..8])
    )
}

/// Waits until the admin sees `count` records after `since` (the writer is
/// a task of its own).
async fn records(node: &TestNode, since: u64, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = node
            .get(Some("admin-key"), &format!("/v1/audit?since={since}"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let records = reply.body["records"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if records.len() >= count || tokio::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_recorded_with_key_tenant_route_and_rows_and_kept_per_tenant() {
    let node = start_node(|config| config.audit.large_read_rows = 5).await;
    let metrics_count = common::test_config().metrics.len();
    // ingest is not a read: no record
    assert_eq!(
        node.post("demo-key", &[order("o-1", 100, T0_MS)])
            .await
            .body["accepted"],
        1
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics").await.status,
        StatusCode::OK
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics/gmv?window=30s")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        node.get(Some("admin-key"), "/v1/quarantine?tenant=acme")
            .await
            .status,
        StatusCode::OK
    );
    // a refused read is recorded too, with its status
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics?tenant=acme")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // a live subscription
    let url = format!("{}/v1/live", node.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer demo-key".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
        .send(Message::Text(
            json!({"op": "subscribe", "id": "s", "metrics": ["gmv", "orders"]})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    // a scrape with the tenant's key
    assert_eq!(
        node.get(Some("demo-key"), "/metrics").await.status,
        StatusCode::OK
    );

    let all = records(&node, 0, 6).await;
    let summary: Vec<(String, String, String, u64)> = all
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["tenant"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let demo = key_id("tenant", "demo-key");
    let admin = key_id("admin", "admin-key");
    let expected = [
        (
            demo.clone(),
            "demo".to_string(),
            "GET /v1/metrics".to_string(),
            200,
        ),
        (
            demo.clone(),
            "demo".into(),
            "GET /v1/metrics/{name}".into(),
            200,
        ),
        (
            admin.clone(),
            "acme".into(),
            "GET /v1/quarantine".into(),
            200,
        ),
        (demo.clone(), "demo".into(), "GET /v1/metrics".into(), 403),
    ];
    assert_eq!(summary[..4], expected);
    assert!(
        summary[4..].contains(&(demo.clone(), "demo".into(), "ws subscribe".into(), 200)),
        "{summary:?}"
    );
    assert!(
        summary[4..].contains(&(demo.clone(), "demo".into(), "GET /metrics".into(), 200)),
        "{summary:?}"
    );
    // rows, the large flag, the address and the target
    assert_eq!(all[0]["rows"], metrics_count as u64);
    assert_eq!(all[0]["large"], true);
    assert_eq!(all[1]["rows"], 1);
    assert_eq!(all[1]["large"], false);
    assert_eq!(all[1]["target"], "/v1/metrics/gmv?window=30s");
    assert_eq!(all[0]["address"], "127.0.0.1");
    let subscribed = all.iter().find(|r| r["action"] == "ws subscribe").unwrap();
    assert_eq!(subscribed["target"], "metrics gmv,orders");
    assert_eq!(subscribed["rows"], 2);
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());

    // a tenant reads its own records only; another tenant's is 403
    let own = node.get(Some("demo-key"), "/v1/audit?since=0").await;
    assert_eq!(own.status, StatusCode::OK);
    let tenants: Vec<&str> = own.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tenant"].as_str().unwrap())
        .collect();
    assert!(
        !tenants.is_empty() && tenants.iter().all(|t| *t == "demo"),
        "{tenants:?}"
    );
    assert_eq!(
        node.get(Some("demo-key"), "/v1/audit?tenant=acme")
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        node.get(None, "/v1/audit").await.status,
        StatusCode::UNAUTHORIZED
    );

    // kept across a restart; the seq goes on
    let last = *seqs.last().unwrap();
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics").await.status,
        StatusCode::OK
    );
    // the reads of the audit log are recorded too: wait for the read made
    // after the restart, not for a count
    let read_after = |records: &[Value]| {
        records
            .iter()
            .any(|r| r["seq"].as_u64().unwrap() > last && r["action"] == "GET /v1/metrics")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut after = records(&node, 0, all.len() + 1).await;
    while !read_after(&after) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = records(&node, 0, all.len() + 1).await;
    }
    assert!(after.len() > all.len());
    assert_eq!(after[..all.len()], all[..]);
    assert!(read_after(&after), "{after:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_refusals_from_one_address_is_recorded_and_counted() {
    let node = start_node(|config| config.audit.auth_failures_per_minute_max = 5).await;
    for _ in 0..8 {
        assert_eq!(
            node.get(Some("stolen-key"), "/v1/metrics").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let all = records(&node, 0, 1).await;
    let bursts: Vec<&Value> = all
        .iter()
        .filter(|r| r["action"] == "auth_failure_burst")
        .collect();
    assert_eq!(bursts.len(), 1, "one record for the burst: {all:?}");
    assert_eq!(bursts[0]["address"], "127.0.0.1");
    assert_eq!(bursts[0]["status"], 401);
    // the refused requests themselves read nothing: no other record (but
    // this test's own polls of the audit log, which are reads)
    let others: Vec<&Value> = all
        .iter()
        .filter(|r| r["action"] != "GET /v1/audit")
        .collect();
    assert_eq!(others.len(), 1, "{all:?}");
    let scrape = node.get(Some("admin-key"), "/metrics").await;
    let text = scrape.body.as_str().unwrap_or_default();
    assert!(
        text.contains("\ntally_auth_failure_bursts_total "),
        "{text}"
    );
    assert!(
        text.contains("\ntally_auth_failures_total{status=\"401\"} "),
        "{text}"
    );
    node.stop().await;
}
