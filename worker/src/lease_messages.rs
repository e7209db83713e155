//! The worker protocol's messages about one lease: an Assign read as the action to run,
//! and the LeaseResult that reports its outcome (or why it was refused).

use std::time::Duration;

use kiln_proto::worker::v1 as proto;
use kiln_store::{Digest, DigestFunction};

use crate::action_runner::{ActionOutcome, ActionRequest};
use crate::WorkerError;

/// The action an Assign hands over, checked: a lease id and a well-formed digest.
pub(crate) fn action_request(assign: &proto::Assign) -> Result<ActionRequest, WorkerError> {
    if assign.lease_id.is_empty() {
        return Err(WorkerError::Protocol("an Assign has no lease id".into()));
    }
    let function = DigestFunction::from_reapi_value(assign.digest_function)?;
    let digest = assign
        .action_digest
        .as_ref()
        .ok_or_else(|| WorkerError::InvalidAction("the Assign has no action digest".into()))?;
    let action_digest = Digest::parse_reapi(function, &digest.hash, digest.size_bytes)?;
    let timeout = assign.timeout.and_then(|d| {
        (d.seconds > 0 || d.nanos > 0)
            .then(|| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
    });
    Ok(ActionRequest {
        instance_name: assign.instance_name.clone(),
        action_digest,
        timeout,
        queued_timestamp: assign.queued_timestamp,
        // REAPI: worker_start_timestamp is "when the worker received the action".
        received_timestamp: Some(crate::action_runner::timestamp(std::time::SystemTime::now())),
        inline_action: (!assign.action.is_empty()).then(|| assign.action.clone()),
        inline_command: (!assign.command.is_empty()).then(|| assign.command.clone()),
    })
}

/// The LeaseResult for an outcome: the ActionResult, and OK or the error's status.
pub fn lease_result(lease_id: String, outcome: ActionOutcome) -> proto::LeaseResult {
    let status = match &outcome.error {
        None => kiln_proto::rpc::Status {
            code: tonic::Code::Ok as i32,
            ..Default::default()
        },
        Some(error) => error.to_rpc_status(),
    };
    proto::LeaseResult {
        lease_id,
        action_result: outcome.action_result,
        status: Some(status),
        execution_metadata: Some(outcome.execution_metadata),
    }
}

/// A LeaseResult refusing the lease without running it.
pub(crate) fn refusal(lease_id: String, error: WorkerError) -> proto::LeaseResult {
    proto::LeaseResult {
        lease_id,
        action_result: None,
        status: Some(error.to_rpc_status()),
        execution_metadata: None,
    }
}
