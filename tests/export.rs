//! CSV export (API.md §10; docs/api.md, "Export") against a real node: a
//! breakdown and a series parse back (the `csv` crate) to exactly the JSON
//! values, money with its currency and ISO 4217 decimals, times in the
//! tenant's zone; a tenant key exports only its tenant; past the row limit a
//! clear error, not a cut file; a 100 000-row export streams.

mod common;

use reqwest::StatusCode;
use serde_json::{json, Value};

use common::{start_node, TestNode, T0_MS};

async fn get_csv(
    node: &TestNode,
    key: &str,
    path: &str,
) -> (StatusCode, String, reqwest::header::HeaderMap) {
    let response = node
        .client
        .get(format!("{}{path}", node.base))
        .bearer_auth(key)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, response.text().await.unwrap(), headers)
}

fn parse(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header = reader.headers().unwrap().iter().map(String::from).collect();
    let rows = reader
        .records()
        .map(|record| record.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

fn order(id: &str, amount: i64, device: &str, currency: &str) -> Value {
    json!({"id": id, "type": "order.completed", "ts": T0_MS, "amount": amount,
           "currency": currency, "dims": {"device": device}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breakdown_and_a_series_parse_back_to_the_json_values() {
    let node = start_node(|_| {}).await;
    // acme: EUR, Europe/Berlin; a device value with a comma and a quote
    let events = [
        order("a", 1250, "ios", "EUR"),
        order("b", 800, "web, \"desktop\"", "EUR"),
        order("c", 5, "ios", "EUR"),
    ];
    assert_eq!(node.post("acme-key", &events).await.body["accepted"], 3);

    let json_reply = node
        .get(Some("acme-key"), "/v1/metrics/gmv?by=device")
        .await;
    let (status, text, headers) = get_csv(&node, "acme-key", "/v1/metrics/gmv?by=device").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let (header, rows) = parse(&text);
    assert_eq!(
        header,
        [
            "device",
            "window",
            "count",
            "prev",
            "prev_count",
            "value",
            "currency",
            "amount"
        ]
    );
    assert_eq!(rows.len(), 2 * 3, "two values, three windows");
    for row in &rows {
        let window = &json_reply.body["values"][&row[0]]["windows"][&row[1]];
        assert!(window.is_object(), "{row:?}");
        for (index, field) in ["count", "prev", "prev_count", "value"].iter().enumerate() {
            let expected = match &window[field] {
                Value::Null => String::new(),
                other => other.to_string(),
            };
            assert_eq!(row[2 + index], expected, "{field} of {row:?}");
        }
        assert_eq!(row[6], "EUR");
    }
    let ios_today = rows
        .iter()
        .find(|row| row[0] == "ios" && row[1] == "today")
        .unwrap();
    assert_eq!(
        (ios_today[5].as_str(), ios_today[7].as_str()),
        ("1255", "12.55")
    );
    assert!(rows.iter().any(|row| row[0] == "web, \"desktop\""));

    // the series: at in Berlin time, value and count as the JSON has them
    node.clock.advance_ms(5_000);
    let path = "/v1/metrics/gmv/series?window=30s&step=10s";
    let json_series = node.get(Some("acme-key"), path).await.body;
    let (status, text, _) = get_csv(&node, "acme-key", &format!("{path}&format=csv")).await;
    assert_eq!(status, StatusCode::OK);
    let (header, rows) = parse(&text);
    assert_eq!(header, ["at", "value", "count", "currency", "amount"]);
    let points = json_series["points"].as_array().unwrap();
    assert_eq!(rows.len(), points.len());
    for (row, point) in rows.iter().zip(points) {
        let at = chrono::DateTime::parse_from_rfc3339(&row[0]).unwrap();
        assert_eq!(at.timestamp_millis(), point[0].as_i64().unwrap());
        assert_eq!(at.offset().local_minus_utc(), 3_600, "Berlin in November");
        assert_eq!(row[1], point[1].to_string());
    }
    let busy: Vec<&Vec<String>> = rows.iter().filter(|row| row[1] != "0").collect();
    assert_eq!(busy.len(), 1);
    assert_eq!(
        (
            busy[0][1].as_str(),
            busy[0][2].as_str(),
            busy[0][4].as_str()
        ),
        ("2055", "3", "20.55")
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_keep_to_the_tenant_and_refuse_past_the_row_limit() {
    let node = start_node(|config| config.export.rows_max = 5).await;
    let events = [order("a", 1, "ios", "USD"), order("b", 1, "web", "USD")];
    assert_eq!(node.post("demo-key", &events).await.body["accepted"], 2);
    let (status, _, _) = get_csv(&node, "demo-key", "/v1/metrics/gmv?by=device&tenant=acme").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // two values × three windows = 6 rows > 5: an error, not a cut file
    let (status, text, _) = get_csv(&node, "demo-key", "/v1/metrics/gmv?by=device").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"], "export_too_large");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("export.rows_max (5)"));
    // one window fits
    let (status, text, _) =
        get_csv(&node, "demo-key", "/v1/metrics/gmv?by=device&window=today").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(parse(&text).1.len(), 2);
    // a bad format is said so; CSV of a metric's total is not an export
    let bad = node
        .get(Some("demo-key"), "/v1/metrics/gmv?by=device&format=xml")
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let (status, _, _) = get_csv(&node, "demo-key", "/v1/metrics/gmv").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // the export is in the audit trail with its rows
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let audit = node
            .get(Some("admin-key"), "/v1/audit?tenant=demo")
            .await
            .body;
        let exported = audit["records"].as_array().unwrap().iter().any(|r| {
            r["target"] == "/v1/metrics/gmv?by=device&window=today"
                && r["rows"] == 2
                && r["status"] == 200
        });
        if exported {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{audit}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    node.stop().await;
}

/// 100 000 device values, one window: 100 000 rows, sent in chunks as the
/// client reads (no length known in advance), every row there once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_000_row_export_streams() {
    let node = start_node(|config| config.windows.max_series_per_metric = 100_000).await;
    for batch in 0..100 {
        let events: Vec<Value> = (0..1_000)
            .map(|n| {
                let id = batch * 1_000 + n;
                order(&format!("o{id}"), 1, &format!("d{id:06}"), "USD")
            })
            .collect();
        assert_eq!(node.post("demo-key", &events).await.body["accepted"], 1_000);
    }
    let peak_before = peak_resident_kib();
    let mut response = node
        .client
        .get(format!(
            "{}/v1/metrics/gmv?by=device&window=today&format=csv",
            node.base
        ))
        .bearer_auth("demo-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers().get("content-length").is_none(),
        "streamed, not sized"
    );
    let (mut chunks, mut text) = (0, Vec::new());
    while let Some(chunk) = response.chunk().await.unwrap() {
        chunks += 1;
        text.extend_from_slice(&chunk);
    }
    let grown_kib = peak_resident_kib() - peak_before;
    println!(
        "100 000-row export: {} bytes in {chunks} chunks; peak resident grew {grown_kib} KiB",
        text.len()
    );
    // the bound docs/api.md states (256 MiB for 100 000 rows): the read's
    // views, as the JSON answer holds them, and one chunk of text at a time
    assert!(grown_kib < 256 * 1024, "peak resident grew {grown_kib} KiB");
    let (_, rows) = parse(std::str::from_utf8(&text).unwrap());
    assert_eq!(rows.len(), 100_000);
    assert!(chunks > 10, "{chunks} chunks");
    let distinct: std::collections::BTreeSet<&String> = rows.iter().map(|row| &row[0]).collect();
    assert_eq!(distinct.len(), 100_000);
    node.stop().await;
}

/// The process's peak resident memory so far (`VmHWM`), in KiB.
fn peak_resident_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
