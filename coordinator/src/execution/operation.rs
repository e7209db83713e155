//! Operations: one per action in flight, persisted so that a restarted coordinator picks
//! its queue back up and clients can resume with WaitExecution.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::prost::Message;
use kiln_proto::protobuf::Any;
use kiln_proto::reapi::{execution_stage, ExecuteOperationMetadata, ExecuteResponse};
use kiln_store::{Digest, DigestFunction, Keyspace};
use kiln_telemetry::propagation::TraceContext;
use serde::{Deserialize, Serialize};

use crate::scheduler::{Platform, QueuedAction};

/// Operation name → [`OperationRecord`] (JSON).
pub(crate) const OPERATIONS: Keyspace = Keyspace("operations");

/// What the coordinator remembers of an operation across restarts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct OperationRecord {
    pub name: String,
    pub instance_name: String,
    pub function: String,
    pub action_hash: String,
    pub action_size: u64,
    pub priority: i32,
    pub invocation: String,
    pub platform: Vec<(String, String)>,
    pub input_root_hash: String,
    pub timeout_nanos: u64,
    pub do_not_cache: bool,
    pub queued_at_unix_nanos: u64,
    /// The encoded ExecuteResponse, once the operation is done.
    pub response: Option<Vec<u8>>,
    /// The W3C trace context of the Execute call that started the operation, so that the
    /// worker's spans join the client's trace after a coordinator restart too. Empty when
    /// that call was not traced, and in records written before kiln kept it.
    #[serde(default)]
    pub traceparent: String,
    #[serde(default)]
    pub tracestate: String,
}

impl OperationRecord {
    pub fn action_digest(&self) -> Digest {
        let function = DigestFunction::from_name(&self.function).unwrap_or(DigestFunction::Sha256);
        Digest::parse_reapi(function, &self.action_hash, self.action_size as i64)
            .unwrap_or_else(|_| Digest::new(function, [0; 32], self.action_size))
    }

    pub fn queued_action(&self) -> QueuedAction {
        let mut affinity = [0u8; 32];
        let _ = hex::decode_to_slice(&self.input_root_hash, &mut affinity);
        QueuedAction {
            operation: self.name.clone(),
            priority: self.priority,
            invocation: self.invocation.clone(),
            platform: Platform::new(self.platform.iter().cloned()),
            affinity,
            // Attempts are not persisted: after a restart an action starts its count again.
            attempts: 0,
        }
    }

    /// The context the operation's spans continue.
    pub fn trace_context(&self) -> TraceContext {
        TraceContext {
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        (self.timeout_nanos > 0).then(|| Duration::from_nanos(self.timeout_nanos))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("operation records serialise")
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The longrunning Operation clients see, at `stage`.
    pub fn to_operation(&self, stage: execution_stage::Value) -> Operation {
        let action = self.action_digest();
        let metadata = ExecuteOperationMetadata {
            stage: stage as i32,
            action_digest: Some(action.to_reapi()),
            digest_function: action.function.reapi_value(),
            ..Default::default()
        };
        Operation {
            name: self.name.clone(),
            metadata: Some(pack(
                "build.bazel.remote.execution.v2.ExecuteOperationMetadata",
                &metadata,
            )),
            done: self.response.is_some(),
            result: self.response.as_ref().map(|response| {
                operation::Result::Response(Any {
                    type_url: type_url("build.bazel.remote.execution.v2.ExecuteResponse"),
                    value: response.clone(),
                })
            }),
        }
    }
}

fn type_url(name: &str) -> String {
    format!("type.googleapis.com/{name}")
}

fn pack(name: &str, message: &impl Message) -> Any {
    Any {
        type_url: type_url(name),
        value: message.encode_to_vec(),
    }
}

/// A finished operation's Operation message, for responses that never were queued
/// (action cache hits).
pub(crate) fn completed_operation(
    name: String,
    action: &Digest,
    response: &ExecuteResponse,
) -> Operation {
    let record = OperationRecord {
        name,
        function: action.function.name().to_string(),
        action_hash: action.hex(),
        action_size: action.size,
        response: Some(response.encode_to_vec()),
        ..Default::default()
    };
    record.to_operation(execution_stage::Value::Completed)
}

pub(crate) fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub(crate) fn proto_duration(duration: Duration) -> kiln_proto::protobuf::Duration {
    kiln_proto::protobuf::Duration {
        seconds: duration.as_secs() as i64,
        nanos: duration.subsec_nanos() as i32,
    }
}

pub(crate) fn timestamp_from_nanos(nanos: u64) -> kiln_proto::protobuf::Timestamp {
    kiln_proto::protobuf::Timestamp {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> OperationRecord {
        let action = Digest::of_bytes(DigestFunction::Sha256, b"action");
        OperationRecord {
            name: "operations/a".into(),
            function: action.function.name().to_string(),
            action_hash: action.hex(),
            action_size: action.size,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: "vendor=value".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_trace_context_survives_encoding() {
        let record = record();
        let decoded = OperationRecord::decode(&record.encode()).expect("the record decodes");
        assert_eq!(decoded.trace_context(), record.trace_context());
        assert_eq!(decoded.action_digest(), record.action_digest());
    }

    #[test]
    fn records_written_before_trace_contexts_were_kept_still_decode() {
        let mut json = serde_json::to_value(record()).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("traceparent").expect("the field is written");
        fields.remove("tracestate").expect("the field is written");
        let old = serde_json::to_vec(&json).unwrap();

        let decoded = OperationRecord::decode(&old).expect("an old record decodes");
        assert_eq!(decoded.trace_context(), TraceContext::default());
        assert_eq!(decoded.action_digest(), record().action_digest());
    }
}
