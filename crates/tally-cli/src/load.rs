//! Sending NDJSON batches to a server over HTTP with N concurrent connections.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, bail};

/// Outcome counters of a load run.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub batches: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub retries: AtomicU64,
}

static API_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The API key every later [`client`] sends (`--api-key` / `TALLY_API_KEY`,
/// for a server in keyed mode).
pub fn set_api_key(key: String) {
    let _ = API_KEY.set(key);
}

pub fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(v) = API_KEY
        .get()
        .and_then(|k| reqwest::header::HeaderValue::from_str(&format!("Bearer {k}")).ok())
    {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_default()
}

/// Posts one NDJSON batch, retrying on 429/503 (honouring Retry-After) and
/// connection errors; returns (accepted, rejected).
pub async fn post_batch(
    client: &reqwest::Client,
    url: &str,
    body: bytes::Bytes,
    stats: &LoadStats,
) -> anyhow::Result<(u64, u64)> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let r = client
            .post(url)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                let text = resp.text().await.context("reading ingest answer")?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).context("ingest answer is not JSON")?;
                let a = v["accepted"].as_u64().unwrap_or(0);
                let rj = v["rejected"].as_u64().unwrap_or(0);
                stats.batches.fetch_add(1, Relaxed);
                stats.accepted.fetch_add(a, Relaxed);
                stats.rejected.fetch_add(rj, Relaxed);
                return Ok((a, rj));
            }
            Ok(resp) if matches!(resp.status().as_u16(), 429 | 503) && attempt < 100 => {
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .unwrap_or(1);
                stats.retries.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis((wait * 1000).min(2000) / 4 + 10)).await;
            }
            Ok(resp) => {
                let s = resp.status();
                let text = resp.text().await.unwrap_or_default();
                bail!("server answered {s}: {text}");
            }
            Err(e) if attempt < 100 => {
                stats.retries.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "retrying batch");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("sending batch"),
        }
    }
}
