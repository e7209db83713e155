//! The gRPC faces of the engine: REAPI `Execution` and `google.longrunning.Operations`.

use kiln_proto::longrunning::{
    operations_server::Operations, CancelOperationRequest, DeleteOperationRequest,
    GetOperationRequest, ListOperationsRequest, ListOperationsResponse, Operation,
    WaitOperationRequest,
};
use kiln_proto::protobuf::Empty;
use kiln_proto::reapi::{execution_server::Execution, ExecuteRequest, WaitExecutionRequest};
use tonic::{Request, Response, Status};

use super::admission::OperationStream;
use super::ExecutionEngine;
use super::{Executor, Route};
use crate::auth::{authorize, caller_of, Caller, Scope};
use crate::CoordinatorError;

/// The REAPI Execution service.
pub(crate) struct ExecutionService {
    executor: Executor,
}

impl ExecutionService {
    pub(crate) fn new(executor: Executor) -> Self {
        ExecutionService { executor }
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        authorize(&request, Scope::Execute, &request.get_ref().instance_name)?;
        match self.executor.route(&request)? {
            Route::Here(engine) => Ok(Response::new(engine.execute(request).await?)),
            Route::Leader(leader) => leader.execute(request).await,
        }
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let engine = match self.executor.route(&request)? {
            Route::Here(engine) => engine,
            Route::Leader(leader) => return leader.wait_execution(request).await,
        };
        let caller = caller_of(&request);
        let name = request.into_inner().name;
        engine.may_follow(&caller, &name)?;
        Ok(Response::new(engine.subscribe(&name)?))
    }
}

/// `google.longrunning.Operations`: look-up and cancellation of execution operations.
pub(crate) struct OperationsService {
    executor: Executor,
}

impl OperationsService {
    pub(crate) fn new(executor: Executor) -> Self {
        OperationsService { executor }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let engine = match self.executor.route(&request)? {
            Route::Here(engine) => engine,
            Route::Leader(leader) => return leader.list_operations(request).await,
        };
        let caller = caller_of(&request);
        let state = engine.state();
        // Only the operations of instances the caller may execute on.
        let mut operations: Vec<Operation> = state
            .operations
            .values()
            .filter(|live| caller.allows(Scope::Execute, &live.record.instance_name))
            .map(|live| live.updates.borrow().clone())
            .collect();
        operations.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListOperationsResponse {
            operations,
            ..Default::default()
        }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let engine = match self.executor.route(&request)? {
            Route::Here(engine) => engine,
            Route::Leader(leader) => return leader.get_operation(request).await,
        };
        let caller = caller_of(&request);
        let name = request.into_inner().name;
        engine.may_follow(&caller, &name)?;
        let state = engine.state();
        match state.operations.get(&name) {
            Some(live) => Ok(Response::new(live.updates.borrow().clone())),
            None => Err(CoordinatorError::NotFound(format!("no operation named {name:?}")).into()),
        }
    }

    async fn delete_operation(
        &self,
        _: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        Err(CoordinatorError::Unimplemented(
            "DeleteOperation (finished operations expire on their own)",
        )
        .into())
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let engine = match self.executor.route(&request)? {
            Route::Here(engine) => engine,
            Route::Leader(leader) => return leader.cancel_operation(request).await,
        };
        let caller = caller_of(&request);
        let name = request.into_inner().name;
        engine.may_follow(&caller, &name)?;
        engine.cancel(&name)?;
        // The cancelled operation's record; not flushed, like any finished operation's.
        engine.persist().await?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        _: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        Err(CoordinatorError::Unimplemented("WaitOperation (use WaitExecution)").into())
    }
}

impl ExecutionEngine {
    /// An operation is the business of whoever may execute on its instance: they alone
    /// may follow, list or cancel it.
    fn may_follow(&self, caller: &Caller, name: &str) -> Result<(), CoordinatorError> {
        let instance = match self.state().operations.get(name) {
            Some(live) => live.record.instance_name.clone(),
            None => {
                return Err(CoordinatorError::NotFound(format!(
                    "no operation named {name:?}"
                )))
            }
        };
        caller.require(Scope::Execute, &instance)
    }
}
