//! Where this replica's Execution, Operations and Workers calls are answered: its own
//! engine, or, in a farm, the leader's through a forward (see `crate::farm`). A replica
//! runs an engine only while it leads.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tonic::Request;

use super::ExecutionEngine;
use crate::farm::{was_forwarded, Leader, LeaderLink, Role, Tenure};
use crate::CoordinatorError;

/// How often the keeper checks that the leader's tenure still holds, so that a leader
/// whose election rounds stall stops scheduling within this of its tenure's end.
const TENURE_CHECK: Duration = Duration::from_millis(250);

/// Where this replica's Execution, Operations and Workers calls are answered.
#[derive(Clone)]
pub(crate) enum Executor {
    /// A coordinator on its own: its engine answers everything.
    Alone(ExecutionEngine),
    /// A replica of a farm: the leader's engine answers, here or through a forward.
    Farm(Arc<Member>),
}

/// Where one call goes.
pub(crate) enum Route {
    Here(ExecutionEngine),
    Leader(Leader),
}

impl Executor {
    pub(crate) fn route<T>(&self, request: &Request<T>) -> Result<Route, CoordinatorError> {
        match self {
            Executor::Alone(engine) => Ok(Route::Here(engine.clone())),
            Executor::Farm(member) => member.route(was_forwarded(request)),
        }
    }
}

/// One replica's view of the farm: its engine while it leads, and the way to the leader
/// while it follows.
pub(crate) struct Member {
    engine: RwLock<Option<ExecutionEngine>>,
    role: watch::Receiver<Role>,
    /// The way to the current leader.
    link: LeaderLink,
    message_limit: usize,
    /// Set when this replica shuts down (see [`Leader::closing`]).
    closing: watch::Receiver<bool>,
}

impl Member {
    pub(crate) fn new(
        role: watch::Receiver<Role>,
        link: LeaderLink,
        message_limit: usize,
        closing: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Member {
            engine: RwLock::new(None),
            role,
            link,
            message_limit,
            closing,
        })
    }

    fn engine(&self) -> Option<ExecutionEngine> {
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn route(&self, forwarded: bool) -> Result<Route, CoordinatorError> {
        if let Some(engine) = self.engine() {
            return Ok(Route::Here(engine));
        }
        let unavailable = |why: &str| Err(CoordinatorError::Unavailable(why.to_string()));
        match self.role.borrow().clone() {
            Role::Follower { .. } if forwarded => {
                unavailable("this replica is not the farm's leader (any more); try again")
            }
            Role::Follower { address, .. } => Ok(Route::Leader(Leader {
                channel: self.link.channel_to(&address)?,
                message_limit: self.message_limit,
                closing: self.closing.clone(),
            })),
            Role::Leader { .. } => {
                unavailable("this replica is taking over the farm's scheduling; try again")
            }
            Role::Unknown => unavailable("the farm has no leader at the moment; try again"),
        }
    }

    /// Runs an engine while this replica holds a tenure: `open` makes one (reloading the
    /// farm's unfinished operations), and it is closed as soon as the tenure ends, which
    /// ends its worker and operation streams so that they reconnect to the new leader.
    /// Returns when `closing` is set.
    pub(crate) async fn keep_engine(
        self: Arc<Self>,
        mut tenures: watch::Receiver<Option<Arc<Tenure>>>,
        open: impl Fn(Arc<Tenure>) -> BoxFuture<'static, Result<ExecutionEngine, CoordinatorError>>,
        mut closing: watch::Receiver<bool>,
    ) {
        let mut running: Option<(Arc<Tenure>, ExecutionEngine, tokio::task::JoinHandle<()>)> = None;
        loop {
            let wanted = tenures
                .borrow_and_update()
                .clone()
                .filter(|t| t.holds(Instant::now()) && !*closing.borrow());
            let current_is_wanted = match (&running, &wanted) {
                (Some((tenure, ..)), Some(w)) => Arc::ptr_eq(tenure, w),
                (None, None) => true,
                _ => false,
            };
            if !current_is_wanted {
                if let Some((tenure, engine, dispatcher)) = running.take() {
                    tracing::info!(epoch = tenure.epoch, "closing the farm's engine here");
                    *self.engine.write().unwrap_or_else(|p| p.into_inner()) = None;
                    engine.close();
                    let _ = dispatcher.await;
                }
                if let Some(tenure) = wanted {
                    match open(tenure.clone()).await {
                        Ok(engine) => {
                            let dispatcher = engine.spawn_dispatcher();
                            *self.engine.write().unwrap_or_else(|p| p.into_inner()) =
                                Some(engine.clone());
                            running = Some((tenure, engine, dispatcher));
                        }
                        Err(error) => {
                            tracing::error!(%error, "could not open the farm's engine");
                        }
                    }
                }
            }
            if *closing.borrow() && running.is_none() {
                return;
            }
            tokio::select! {
                _ = tenures.changed() => {}
                _ = closing.changed() => {}
                _ = tokio::time::sleep(TENURE_CHECK) => {}
            }
        }
    }
}
