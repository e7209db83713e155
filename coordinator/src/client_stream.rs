//! Reading a client's stream with a bound on silence: a client that opens a stream and
//! then sends nothing (a slow or hostile one, or one whose network died without a FIN)
//! must not hold an upload or a worker slot open forever.

use std::time::Duration;

use tonic::Streaming;

use crate::CoordinatorError;

/// The next message of `stream`, `None` at its end, or [`CoordinatorError::Idle`] when
/// nothing arrives within `idle`.
pub(crate) async fn next_within<T>(
    stream: &mut Streaming<T>,
    idle: Duration,
    what: &'static str,
) -> Result<Option<T>, CoordinatorError> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(status)) => Err(CoordinatorError::ClientStream(status)),
        Err(_) => Err(CoordinatorError::Idle { what, idle }),
    }
}
