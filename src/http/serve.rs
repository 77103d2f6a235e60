//! The HTTP server loop: every connection through hyper's HTTP/1 builder, so
//! that a client slower than `server.header_read_timeout_ms` to send its
//! request line and headers is disconnected (slowloris; `axum::serve` sets no
//! timer, so it never times out), one that stops reading is disconnected after
//! `server.write_timeout_ms`, at most `server.connections_max` connections
//! at once (past it: 503 with `Retry-After`, then close), and a graceful stop.
//! Owns: accepting, the connection cap, per-connection shutdown.
//! Must not: know routes (the router does) or hold a live socket's place (an
//! upgraded connection leaves the loop; live sessions have their own caps).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower_service::Service;

/// The limits of the loop (`[server]`).
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub header_read_timeout: Duration,
    /// How long one write to a client may wait for it to read.
    pub write_timeout: Duration,
    pub connections_max: usize,
    pub retry_after_s: u32,
}

/// Answers a connection past the cap without reading its request: 503, then
/// close. What the client already sent is read away briefly, so that the
/// close does not reset the connection before it reads the answer.
async fn refuse(mut stream: TcpStream, retry_after_s: u32) {
    let body = r#"{"error":"overloaded","message":"the node has server.connections_max connections open; retry"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {retry_after_s}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let answered = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answered).await;
}

/// Serves `router` on `listener` until `stop` resolves; then stops accepting,
/// asks every open connection to finish its request in flight, and returns
/// once they have (the caller bounds that wait with the shutdown grace).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    stop: impl Future<Output = ()>,
) {
    let places = Arc::new(Semaphore::new(limits.connections_max));
    let (stopping, _) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // out of file descriptors, mostly: wait for some to close
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            crate::telemetry::count_shed(crate::telemetry::Shed::Connections);
            tokio::spawn(refuse(stream, limits.retry_after_s));
            continue;
        };
        let _ = stream.set_nodelay(true);
        // a client that stops reading its answer (a large export, a scrape)
        // gives its connection back after the write deadline
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(limits.write_timeout));
        let stream = Box::pin(stream);
        // every request knows its peer (the audit trail records it)
        let routes = router.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                // a router is ready at once; each call takes its own clone
                routes.clone().call(request)
            },
        );
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut stopping = stopping.subscribe();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = async { let _ = stopping.wait_for(|stopping| *stopping).await; } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(place);
        });
    }
    drop(listener);
    stopping.send_replace(true);
    // every place back: every connection has finished
    let _ = places.acquire_many(limits.connections_max as u32).await;
}
