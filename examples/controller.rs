//! An example experiment controller (docs/experiments.md, "Controllers"):
//! subscribes to a tenant's `signals` topic, prints what it would do with
//! each signal, and keeps the last seq it handled in a file, so that after a
//! restart (its own or the node's) it resumes with `since` and sees each
//! signal exactly once.
//!
//! ```text
//! cargo run --example controller -- ws://127.0.0.1:7700/v1/live demo-key controller.since
//! ```
//!
//! A real controller would call its feature-flag service where this prints;
//! it must record the seq only after acting, as here, so that a crash in
//! between makes it act again (at least once), and act idempotently, e.g. by
//! the signal's `id`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The last seq handled, or 0 when the file is not there yet.
fn read_since(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Written to a temporary file and renamed over the old one, so that a crash
/// leaves either seq whole.
fn write_since(path: &Path, seq: u64) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, format!("{seq}\n"))?;
    std::fs::rename(&temporary, path)
}

/// What the controller would do.
fn act(signal: &Value) {
    let experiment = signal["experiment"].as_str().unwrap_or("?");
    let variant = signal["variant"].as_str().unwrap_or("-");
    match signal["action"].as_str() {
        Some("stop") => println!(
            "would STOP {experiment}: variant {variant} breached {} (observed {}, control {}, threshold {}, p {})",
            signal["guardrail"], signal["observed"], signal["baseline"], signal["threshold"], signal["p_value"]
        ),
        Some("pause") => println!(
            "would PAUSE {experiment}: variant {variant} breached {} (observed {}, control {}, threshold {})",
            signal["guardrail"], signal["observed"], signal["baseline"], signal["threshold"]
        ),
        Some("srm") => println!(
            "would FLAG {experiment}: sample ratio mismatch (chi-square {}, p {}, {} samples)",
            signal["observed"], signal["p_value"], signal["samples"]
        ),
        Some("resume") => println!("would RESUME {experiment}"),
        _ => println!("unknown signal: {signal}"),
    }
}

/// One connection: subscribes after `since`, handles signals until the
/// connection ends. Returns the last seq handled.
async fn follow(url: &str, key: &str, since_file: &Path, mut since: u64) -> Result<u64, String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    let bearer = format!("Bearer {key}").parse().map_err(|_| "bad key")?;
    request.headers_mut().insert("authorization", bearer);
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| e.to_string())?;
    let subscribe = json!({"op": "subscribe", "id": "signals", "topic": "signals", "since": since});
    socket
        .send(Message::Text(subscribe.to_string().into()))
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("following signals after seq {since}");
    while let Some(message) = socket.next().await {
        let text = match message.map_err(|e| e.to_string())? {
            Message::Text(text) => text,
            Message::Close(frame) => return Err(format!("closed: {frame:?}")),
            _ => continue,
        };
        let Ok(message) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        match message["type"].as_str() {
            Some("signal") => {
                let seq = message["seq"].as_u64().unwrap_or(0);
                // a replay overlapping what was handled: skip it
                if seq <= since {
                    continue;
                }
                act(&message);
                write_since(since_file, seq).map_err(|e| e.to_string())?;
                since = seq;
            }
            Some("error") => eprintln!("node says: {}", message["message"]),
            _ => {}
        }
    }
    Ok(since)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, key, since_file] = args.as_slice() else {
        eprintln!("usage: controller <ws url of /v1/live> <api key> <file keeping the last seq>");
        std::process::exit(2);
    };
    let since_file = PathBuf::from(since_file);
    let mut backoff = Duration::from_secs(1);
    loop {
        let since = read_since(&since_file);
        match follow(url, key, &since_file, since).await {
            Ok(_) => backoff = Duration::from_secs(1),
            Err(error) => eprintln!("connection ended: {error}; again in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
