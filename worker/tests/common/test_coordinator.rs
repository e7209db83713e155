//! The coordinator's side of `kiln.worker.v1`, played by the test: it accepts or refuses
//! a worker by join token, lets the test send Assign, Cancel and Drain, and reports every
//! message the worker sends. The real scheduler lives in kiln-coordinator; this double
//! only speaks the protocol, so the worker loop can be tested on its own.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use kiln_proto::worker::v1 as proto;
use kiln_proto::worker::v1::coordinator_message::Message as ToWorker;
use kiln_proto::worker::v1::worker_message::Message as FromWorker;
use kiln_proto::worker::v1::workers_server::{Workers, WorkersServer};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// What the test coordinator saw.
#[derive(Debug)]
pub enum Event {
    Registered(proto::Register),
    Heartbeat(proto::Heartbeat),
    Result(Box<proto::LeaseResult>),
    Disconnected,
}

type Outbox = mpsc::Sender<Result<proto::CoordinatorMessage, Status>>;

struct Service {
    join_token: String,
    /// Promise heartbeat acknowledgements in RegisterAck, and never send one: a
    /// coordinator that has gone silent behind a connection that stays open.
    silent: bool,
    events: mpsc::UnboundedSender<Event>,
    outbox: Arc<Mutex<Option<Outbox>>>,
}

#[tonic::async_trait]
impl Workers for Service {
    type ConnectStream =
        Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<proto::WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .and_then(|m| m.message)
            .ok_or_else(|| Status::invalid_argument("no Register"))?;
        let FromWorker::Register(register) = first else {
            return Err(Status::invalid_argument(
                "the first message must be Register",
            ));
        };
        let (outbox, receiver) = mpsc::channel(16);
        let accepted = register.join_token == self.join_token;
        let reply = if accepted {
            ToWorker::RegisterAck(proto::RegisterAck {
                heartbeat_interval: Some(kiln_proto::protobuf::Duration {
                    seconds: 0,
                    nanos: 200_000_000,
                }),
                acks_heartbeats: self.silent,
            })
        } else {
            ToWorker::Rejected(proto::Rejected {
                reason: "wrong join token".into(),
            })
        };
        outbox
            .send(Ok(proto::CoordinatorMessage {
                message: Some(reply),
            }))
            .await
            .map_err(|_| Status::internal("outbox closed"))?;
        let _ = self.events.send(Event::Registered(register));
        if accepted {
            *self.outbox.lock().unwrap() = Some(outbox.clone());
            let events = self.events.clone();
            let outboxes = self.outbox.clone();
            tokio::spawn(async move {
                while let Ok(Some(message)) = inbound.message().await {
                    let event = match message.message {
                        Some(FromWorker::Heartbeat(h)) => Event::Heartbeat(h),
                        Some(FromWorker::Result(r)) => Event::Result(Box::new(r)),
                        Some(FromWorker::Register(r)) => Event::Registered(r),
                        None => continue,
                    };
                    let _ = events.send(event);
                }
                // The worker closed its side: close ours, as the protocol asks, unless a
                // newer connection (a reconnect) has taken its place.
                let mut current = outboxes.lock().unwrap();
                if current.as_ref().is_some_and(|o| o.same_channel(&outbox)) {
                    current.take();
                }
                drop(current);
                let _ = events.send(Event::Disconnected);
            });
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

pub struct TestCoordinator {
    pub addr: SocketAddr,
    /// The listening socket, held here too: a restart serves on it again, so the port
    /// is never released for another process to take.
    listener: std::net::TcpListener,
    events: mpsc::UnboundedReceiver<Event>,
    outbox: Arc<Mutex<Option<Outbox>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestCoordinator {
    pub async fn start(join_token: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Self::serve_on(listener, join_token, false)
    }

    /// A coordinator that promises to acknowledge heartbeats and never does.
    pub async fn start_silent(join_token: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Self::serve_on(listener, join_token, true)
    }

    /// Drops the server and every connection, as a crashed coordinator would, with a new
    /// one already serving on the same listening socket: the worker's reconnection is
    /// refused by nothing and waits for nobody, and the port is never released.
    pub async fn restart(mut self, join_token: &str) -> Self {
        let next = Self::serve_on(self.listener.try_clone().unwrap(), join_token, false);
        self.stop_server().await;
        next
    }

    /// Serves on `listener` on a runtime and thread of its own, so that stopping it drops
    /// every connection together, as the death of its process would.
    fn serve_on(listener: std::net::TcpListener, join_token: &str, silent: bool) -> Self {
        let addr = listener.local_addr().unwrap();
        let held = listener.try_clone().unwrap();
        let (events_tx, events) = mpsc::unbounded_channel();
        let outbox = Arc::new(Mutex::new(None));
        let service = Service {
            join_token: join_token.to_string(),
            silent,
            events: events_tx,
            outbox: outbox.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = tonic::transport::Server::builder()
                    .add_service(WorkersServer::new(service))
                    .serve_with_incoming(TcpListenerStream::new(listener));
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops the per-connection tasks and closes their sockets.
            drop(runtime);
        });
        TestCoordinator {
            addr,
            listener: held,
            events,
            outbox,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop_server(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// Sends `message` on the worker's current stream. A worker between two connections
    /// (it may reconnect once more after a restart, seen in CI on a loaded machine) is
    /// waited for, up to 20 s, rather than failing the test.
    pub async fn send(&self, message: ToWorker) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let outbox = loop {
            // The guard is dropped before any panic, so the lock is never poisoned.
            let current = self.outbox.lock().unwrap().clone();
            match current {
                Some(outbox) => break outbox,
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                None => panic!("no registered worker within 20 s"),
            }
        };
        outbox
            .send(Ok(proto::CoordinatorMessage {
                message: Some(message),
            }))
            .await
            .expect("the worker's stream is open");
    }

    /// The next event, failing the test after 20 s.
    pub async fn next_event(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(20), self.events.recv())
            .await
            .expect("an event within 20 s")
            .expect("the test coordinator is running")
    }

    /// Skips events until `pick` accepts one.
    pub async fn wait_for<T>(&mut self, mut pick: impl FnMut(Event) -> Option<T>) -> T {
        loop {
            if let Some(found) = pick(self.next_event().await) {
                return found;
            }
        }
    }

    pub async fn result(&mut self) -> proto::LeaseResult {
        self.wait_for(|e| match e {
            Event::Result(r) => Some(*r),
            _ => None,
        })
        .await
    }

    /// Waits for a heartbeat listing exactly these running leases.
    pub async fn running(&mut self, lease_ids: &[&str]) {
        self.wait_for(|e| match e {
            Event::Heartbeat(h) if h.running_lease_ids == lease_ids => Some(()),
            _ => None,
        })
        .await
    }

    /// Waits for a heartbeat saying the worker is draining.
    pub async fn draining(&mut self) {
        self.wait_for(|e| match e {
            Event::Heartbeat(h) if h.draining => Some(()),
            _ => None,
        })
        .await
    }

    pub async fn registered(&mut self) -> proto::Register {
        self.wait_for(|e| match e {
            Event::Registered(r) => Some(r),
            _ => None,
        })
        .await
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
