//! Reading request bodies so that slow clients cannot hold the registry's upload slots:
//! every chunk must arrive within `limits.body_idle_timeout_secs`, and once a body has
//! been flowing for that long its average rate must stay above
//! `limits.min_body_bytes_per_sec`. A client dripping a byte now and then (slowloris)
//! would otherwise keep a permit for as long as it liked; 64 of them, every permit.

use std::time::{Duration, Instant};

use axum::body::{Body, BodyDataStream};
use bytes::Bytes;
use futures::StreamExt;

use crate::config::LimitsConfig;

/// Why a body was cut off, or failed.
#[derive(Debug)]
pub enum BodyError {
    /// Too slow: 408 Request Timeout.
    Slow(String),
    /// The connection failed mid-body.
    Failed(String),
}

pub struct BodyReader {
    stream: BodyDataStream,
    idle: Duration,
    min_rate: u64,
    started: Instant,
    received: u64,
}

impl BodyReader {
    pub fn new(body: Body, limits: &LimitsConfig) -> Self {
        BodyReader {
            stream: body.into_data_stream(),
            idle: Duration::from_secs(limits.body_idle_timeout_secs.max(1)),
            min_rate: limits.min_body_bytes_per_sec,
            started: Instant::now(),
            received: 0,
        }
    }

    /// The next chunk, `None` at the end of the body.
    pub async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        let chunk = match tokio::time::timeout(self.idle, self.stream.next()).await {
            Err(_) => {
                return Err(BodyError::Slow(format!(
                    "no data for {}s (limits.body_idle_timeout_secs)",
                    self.idle.as_secs()
                )))
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(BodyError::Failed(e.to_string())),
            Ok(Some(Ok(chunk))) => chunk,
        };
        self.received += chunk.len() as u64;
        let elapsed = self.started.elapsed();
        if self.min_rate > 0 && elapsed > self.idle {
            let rate = self.received as f64 / elapsed.as_secs_f64();
            if rate < self.min_rate as f64 {
                return Err(BodyError::Slow(format!(
                    "{rate:.0} bytes/s after {}s, under limits.min_body_bytes_per_sec ({})",
                    elapsed.as_secs(),
                    self.min_rate
                )));
            }
        }
        Ok(Some(chunk))
    }
}
