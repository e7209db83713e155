//! `--otlp`: a benchmark with span export on, to an OTLP receiver in the same process, so
//! that its figures can be set against the same benchmark with export off.
//!
//! The receiver stands in for a collector on another machine, so its work is not kiln's:
//! it runs on a thread of its own, whose CPU time [`BenchTracing::receiver_cpu`] reports
//! so that a benchmark can tell it apart from the CPU time of the rest of the process.

use std::time::Duration;

use kiln_telemetry::receiver::{OtlpReceiver, Retain};
use kiln_telemetry::{TelemetryGuard, TelemetryOptions};
use tokio::sync::oneshot;

use crate::load::thread_cpu_time;

/// The benchmark process's tracing: log lines as `RUST_LOG` says (errors by default) and,
/// with `--otlp`, every kiln span exported over OTLP/gRPC to a counting receiver.
pub struct BenchTracing {
    receiver: Option<ReceiverThread>,
    guard: TelemetryGuard,
}

/// The receiver, served by a single-threaded runtime on its own OS thread.
struct ReceiverThread {
    receiver: OtlpReceiver,
    runtime: tokio::runtime::Handle,
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl BenchTracing {
    /// Installs the global subscriber; call it inside the runtime.
    pub async fn install(otlp: bool) -> anyhow::Result<Self> {
        let receiver = match otlp {
            true => Some(ReceiverThread::start().await?),
            false => None,
        };
        let options = TelemetryOptions {
            log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            otlp_endpoint: receiver.as_ref().map(|r| r.receiver.endpoint()),
        };
        let guard = kiln_telemetry::init("kiln-bench", &options)?;
        Ok(BenchTracing { receiver, guard })
    }

    /// The receiver's OTLP endpoint, with export on.
    pub fn receiver_endpoint(&self) -> Option<String> {
        self.receiver.as_ref().map(|r| r.receiver.endpoint())
    }

    /// Sends the spans ended so far to the receiver and waits for the export. Call it on a
    /// thread that may block (e.g. inside `block_in_place`).
    pub fn flush(&self) {
        self.guard.flush();
    }

    /// CPU time the receiver's thread has used so far; zero with export off.
    pub async fn receiver_cpu(&self) -> Duration {
        match &self.receiver {
            Some(receiver) => receiver
                .runtime
                .spawn(async { thread_cpu_time() })
                .await
                .unwrap_or_default(),
            None => Duration::ZERO,
        }
    }

    /// "export on (N spans received)" or "export off", after flushing what is left.
    pub async fn finish(self) -> anyhow::Result<String> {
        let BenchTracing { receiver, guard } = self;
        // Shutting the exporter down blocks until its last batch is sent through this
        // runtime; keep it off the async workers.
        tokio::task::spawn_blocking(move || drop(guard)).await?;
        Ok(match receiver {
            Some(receiver) => {
                let spans = receiver.receiver.span_count();
                receiver.stop();
                format!("export on ({spans} spans received)")
            }
            None => "export off".to_string(),
        })
    }
}

impl ReceiverThread {
    async fn start() -> anyhow::Result<Self> {
        let (started, on_start) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => return drop(started.send(Err(anyhow::Error::from(e)))),
                };
                runtime.block_on(async move {
                    let (stop, on_stop) = oneshot::channel();
                    let receiver = OtlpReceiver::start(Retain::CountOnly).await;
                    let started_ok = receiver.is_ok();
                    let _ = started.send(
                        receiver
                            .map(|r| (r, tokio::runtime::Handle::current(), stop))
                            .map_err(anyhow::Error::from),
                    );
                    if started_ok {
                        let _ = on_stop.await;
                    }
                });
            })?;
        let (receiver, runtime, stop) = on_start.await??;
        Ok(ReceiverThread {
            receiver,
            runtime,
            stop,
            thread,
        })
    }

    fn stop(self) {
        drop(self.receiver);
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
