//! Tenant keys at run time (docs/api.md, "Tenant keys"): an admin adds and
//! revokes keys without a restart; a revoked key is refused at its next
//! request and its live session is closed; changes survive a restart.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{start_node, start_node_in, Reply, TestNode};

async fn add_key(node: &TestNode, key: &str, tenant: &str, body: Option<Value>) -> Reply {
    let mut request = node
        .client
        .post(format!("{}/v1/tenants/{tenant}/keys", node.base))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    node.send(request).await
}

fn id_of(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_added_and_revoked_at_run_time_and_kept_across_a_restart() {
    let node = start_node(|_| {}).await;
    let added = add_key(&node, "admin-key", "demo", None).await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let secret = added.body["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("tly_") && secret.len() == 52, "{secret}");
    assert_eq!(added.body["key_id"], id_of(&secret));
    assert_eq!(
        node.get(Some(&secret), "/v1/metrics").await.status,
        StatusCode::OK
    );
    // one of the caller's choosing
    let chosen = "a-rotated-key-of-my-own";
    let reply = add_key(&node, "admin-key", "demo", Some(json!({"key": chosen}))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.body["key"], chosen);
    let listed = node.get(Some("admin-key"), "/v1/tenants/demo/keys").await;
    let ids: Vec<(String, String)> = listed.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().into(),
                k["source"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            (id_of("demo-key"), "config".to_string()),
            (id_of(&secret), "api".to_string()),
            (id_of(chosen), "api".to_string())
        ]
    );
    // only admins manage keys; checks name their field; a key in use is refused
    assert_eq!(
        add_key(&node, "demo-key", "demo", None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        add_key(&node, "admin-key", "nobody", None).await.status,
        StatusCode::NOT_FOUND
    );
    let short = add_key(&node, "admin-key", "demo", Some(json!({"key": "short"}))).await;
    assert_eq!(short.status, StatusCode::BAD_REQUEST);
    assert_eq!(short.body["errors"][0]["field"], "key");
    let taken = add_key(
        &node,
        "admin-key",
        "demo",
        Some(json!({"key": "acme-key-is-long-enough"})),
    )
    .await;
    assert_eq!(taken.status, StatusCode::CREATED);
    let in_use = add_key(
        &node,
        "admin-key",
        "acme",
        Some(json!({"key": "acme-key-is-long-enough"})),
    )
    .await;
    assert_eq!(in_use.status, StatusCode::CONFLICT, "{}", in_use.body);

    // a live session of the new key, then its revocation: closed at once
    let url = format!("{}/v1/live", node.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let revoked = node
        .call(
            Method::DELETE,
            "admin-key",
            &format!("/v1/tenants/demo/keys/{}", id_of(&secret)),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{}", revoked.body);
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close: {other:?}"),
        }
    };
    assert_eq!(u16::from(closed.unwrap().code), 4401);
    assert_eq!(
        node.get(Some(&secret), "/v1/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    // a config key can be revoked too (a leaked one)
    let revoked = node
        .call(
            Method::DELETE,
            "admin-key",
            &format!("/v1/tenants/demo/keys/{}", id_of("demo-key")),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        node.call(
            Method::DELETE,
            "admin-key",
            "/v1/tenants/demo/keys/000000000000"
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );

    // after a restart: the revoked stay revoked, the added still work
    let stopped = node.stop_keeping_data().await;
    let node = start_node_in(stopped.data, stopped.clock, |_| {}).await;
    assert_eq!(
        node.get(Some("demo-key"), "/v1/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        node.get(Some(&secret), "/v1/metrics").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        node.get(Some(chosen), "/v1/metrics").await.status,
        StatusCode::OK
    );
    assert_eq!(
        node.get(Some("acme-key"), "/v1/metrics").await.status,
        StatusCode::OK
    );
    node.stop().await;
}
