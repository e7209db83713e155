//! Calls made again after a transient failure, as Bazel's `--remote_retries` does. Every
//! CAS and action-cache call is idempotent (blobs are named by their content, and an
//! action result stored twice is the same result), so a call that failed because a server
//! restarted, a farm replica went away or a balancer reset the connection is simply made
//! again.

use std::future::Future;
use std::time::Duration;

use crate::{ClientError, Result};

/// Tries after the first. With the doubling backoff below they span about 6 s: a replica
/// taken out of a balancer's rotation, a restart, a failover's first seconds.
const RETRIES: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// What tonic's decoder says when a response stream ends in the middle of a message: the
/// connection (or a balancer's backend connection) was cut mid-call, not a server error.
const CUT_MID_MESSAGE: &str = "Unexpected EOF decoding stream";
/// How tonic ends its message when an HTTP response that is not gRPC (a balancer's error
/// page) fails to decode; the status follows. gRPC maps HTTP 502, 503 and 504 to
/// UNAVAILABLE, but tonic reads the page's body first and reports INTERNAL.
const NOT_GRPC_RESPONSE: &str = "while receiving response with status: ";

/// Statuses after which the same call may succeed: the server was restarting, was
/// overloaded, or the connection broke mid-call.
pub(crate) fn is_transient(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Aborted
        | tonic::Code::ResourceExhausted => true,
        // tonic reports a stream cut mid-message as INTERNAL; a replica killed behind
        // HAProxy during a ByteStream read ends that way (farm_faults.sh).
        // A balancer with no backend up (HAProxy while every replica restarts) answers 503.
        tonic::Code::Internal => {
            let message = status.message();
            message.starts_with(CUT_MID_MESSAGE)
                || message
                    .split_once(NOT_GRPC_RESPONSE)
                    .is_some_and(|(_, http)| {
                        ["502", "503", "504"].iter().any(|s| http.starts_with(s))
                    })
        }
        _ => false,
    }
}

impl ClientError {
    /// Whether the call that failed so may succeed if made again.
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Rpc { status, .. } if is_transient(status))
    }
}

/// `call`, made again with backoff while it fails transiently, [`RETRIES`] times at most.
pub(crate) async fn retrying<T, F, Fut>(mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut retries = 0;
    loop {
        match call().await {
            Err(error) if error.is_transient() && retries < RETRIES => {
                retries += 1;
                tracing::warn!(%error, retry = retries, "a transient failure; trying again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn failing(code: tonic::Code) -> ClientError {
        ClientError::rpc("Test", tonic::Status::new(code, "no"))
    }

    #[test]
    fn a_stream_cut_mid_message_is_transient_and_other_internal_errors_are_not() {
        let cut = tonic::Status::internal("Unexpected EOF decoding stream.");
        assert!(is_transient(&cut));
        assert!(!is_transient(&tonic::Status::internal("the server broke")));
        assert!(!is_transient(&tonic::Status::invalid_argument(
            "Unexpected EOF decoding stream."
        )));
    }

    #[test]
    fn a_balancers_gateway_error_page_is_transient_and_other_http_errors_are_not() {
        // As tonic words it when HAProxy answers 503 with its HTML page.
        let page = |status: &str| {
            tonic::Status::internal(format!(
                "protocol error: received message with invalid compression flag: 60 (valid flags are 0 and 1) while receiving response with status: {status}"
            ))
        };
        for status in [
            "502 Bad Gateway",
            "503 Service Unavailable",
            "504 Gateway Timeout",
        ] {
            assert!(is_transient(&page(status)), "{status}");
        }
        for status in [
            "500 Internal Server Error",
            "404 Not Found",
            "403 Forbidden",
        ] {
            assert!(!is_transient(&page(status)), "{status}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_is_tried_again_and_a_lasting_one_is_not() {
        let calls = AtomicU32::new(0);
        let answer = retrying(|| async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(failing(tonic::Code::Unavailable)),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(answer.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = AtomicU32::new(0);
        let answer: Result<()> = retrying(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(failing(tonic::Code::InvalidArgument))
        })
        .await;
        assert!(!answer.unwrap_err().is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // A server that stays down: the first try and RETRIES more, then its error.
        let calls = AtomicU32::new(0);
        let answer: Result<()> = retrying(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(failing(tonic::Code::Unavailable))
        })
        .await;
        assert!(answer.unwrap_err().is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), RETRIES + 1);
    }
}
