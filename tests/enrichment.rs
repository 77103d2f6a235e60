//! Enrichment (API.md §10; docs/api.md, "Enrichment") against a real node: a
//! lookup hit adds its dims to the windows; a miss is quarantined with the
//! missing key; once the table gains the key, a bulk retry applies each
//! event exactly once (run again: nothing more); tables survive a restart.

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::{put_table, start_node, start_node_in, with_stores, TestNode, T0_MS};

const STORES: &str = "/v1/lookups/stores";

fn order(id: &str, amount: i64, store: &str) -> Value {
    json!({"id": id, "type": "order.completed", "ts": T0_MS, "amount": amount,
           "currency": "USD", "dims": {"store": store}})
}

async fn region_gmv(node: &TestNode) -> Value {
    node.get(Some("demo-key"), "/v1/metrics/gmv?by=region&window=today")
        .await
        .body["values"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_enrich_misses_wait_in_quarantine_and_a_bulk_retry_applies_them_once() {
    let node = start_node(with_stores).await;
    let reply = put_table(
        &node,
        Method::PUT,
        STORES,
        "application/x-ndjson",
        "{\"key\": \"s-1\", \"region\": \"north\"}\n{\"key\": \"s-2\", \"region\": \"south\"}\n",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["rows"], 2);
    // a row without its dim is refused by row
    let bad = put_table(
        &node,
        Method::PATCH,
        STORES,
        "application/x-ndjson",
        "{\"key\": \"s-3\"}\n",
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body["errors"][0]["field"], "rows[0].region");

    let sent = node
        .post(
            "demo-key",
            &[
                order("o-1", 100, "s-1"),
                order("o-2", 200, "s-2"),
                order("o-3", 300, "s-9"),
                order("o-4", 400, "s-9"),
            ],
        )
        .await;
    assert_eq!(sent.body["accepted"], 2, "{}", sent.body);
    assert_eq!(sent.body["quarantined"], 2);
    let values = region_gmv(&node).await;
    assert_eq!(values["north"]["windows"]["today"]["value"], 100);
    assert_eq!(values["south"]["windows"]["today"]["value"], 200);
    // the enrichment success rate, on /metrics
    let scrape = node
        .send(
            node.client
                .get(format!("{}/metrics", node.base))
                .bearer_auth("admin-key"),
        )
        .await;
    let text = scrape.body.as_str().unwrap().to_string();
    let lookups = |outcome: &str| -> Option<f64> {
        text.lines()
            .find(|line| {
                line.starts_with("tally_enrichment_lookups_total{")
                    && line.contains("tenant=\"demo\"")
                    && line.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(
        (lookups("hit"), lookups("quarantined"), lookups("unknown")),
        (Some(2.0), Some(2.0), None),
        "{text}"
    );
    let listed = node.get(Some("demo-key"), "/v1/quarantine").await;
    let held = listed.body["events"].as_array().unwrap();
    assert_eq!(held.len(), 2);
    assert_eq!(held[0]["reason"], "enrichment_miss");
    assert_eq!(held[0]["missing"], json!({"table": "stores", "key": "s-9"}));
    assert!(held[0]["remedy"].as_str().unwrap().contains("/v1/lookups/"));

    // before the table has the key, a retry leaves them where they are
    let retried = node
        .call(
            Method::POST,
            "demo-key",
            "/v1/quarantine/retry?reason=enrichment_miss",
        )
        .await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.body);
    assert_eq!(
        (
            retried.body["retried"].clone(),
            retried.body["quarantined"].clone()
        ),
        (json!(2), json!(2))
    );
    // the table gains the key (CSV this time); the retry applies both, once
    let reply = put_table(
        &node,
        Method::PATCH,
        STORES,
        "text/csv",
        "key,region\ns-9,west\n",
    )
    .await;
    assert_eq!(reply.body["rows"], 3, "{}", reply.body);
    let retried = node
        .call(
            Method::POST,
            "demo-key",
            "/v1/quarantine/retry?reason=enrichment_miss",
        )
        .await;
    assert_eq!(
        (
            retried.body["retried"].clone(),
            retried.body["accepted"].clone()
        ),
        (json!(2), json!(2)),
        "{}",
        retried.body
    );
    let again = node
        .call(
            Method::POST,
            "demo-key",
            "/v1/quarantine/retry?reason=enrichment_miss",
        )
        .await;
    assert_eq!(again.body["retried"], 0, "{}", again.body);
    // and sent again by the producer: a duplicate
    let resent = node.post("demo-key", &[order("o-3", 300, "s-9")]).await;
    assert_eq!(resent.body["duplicates"], 1, "{}", resent.body);
    let values = region_gmv(&node).await;
    assert_eq!(values["west"]["windows"]["today"]["value"], 700);
    assert_eq!(values["west"]["windows"]["today"]["count"], 2);
    assert_eq!(
        node.metrics("demo-key").await["metrics"]["gmv"]["windows"]["today"]["value"],
        1_000
    );

    // tables and enriched windows survive a restart; acme has its own tables
    let stopped = node.halt_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, with_stores).await;
    let table = node.get(Some("demo-key"), "/v1/lookups/stores").await;
    assert_eq!(
        table.body["rows"],
        json!([{"key": "s-1", "region": "north"}, {"key": "s-2", "region": "south"}, {"key": "s-9", "region": "west"}])
    );
    assert_eq!(
        region_gmv(&node).await["west"]["windows"]["today"]["value"],
        700
    );
    let acme = node.get(Some("acme-key"), "/v1/lookups/stores").await;
    assert_eq!(acme.body["rows"], json!([]));
    assert_eq!(
        node.get(Some("demo-key"), "/v1/lookups/nothing")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    node.stop().await;
}
