//! An in-process OTLP/gRPC trace receiver on 127.0.0.1:0: the collector's
//! `TraceService/Export`, keeping what it receives for tests to inspect (or only counting
//! it, for benchmarks); and [`TracedRuntime`], a runtime standing in for one process that
//! exports to it, optionally with its log lines kept in memory ([`CapturedLogs`]); and
//! [`TraceCollector`], the two together for a test that runs several "processes", with
//! [`named`] and [`one`] to pick out the spans it asserts on.
//!
//! With [`Retain::CountOnly`] the receiver decodes only as much of each request as
//! counting its spans needs (see `span_counter`), not every span's name, attributes and
//! resource. The benchmarks run it that way: there it stands in for a collector on
//! another machine, yet shares this machine's cores with kiln, so its CPU time must stay
//! small next to the work it measures (a full decode cost about 1.2 µs per span, some 3%
//! of a registry manifest GET).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

mod span_counter;

/// Whether the receiver keeps the spans or only counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retain {
    Spans,
    CountOnly,
}

/// One received span with the resource (process) that sent it.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

impl ReceivedSpan {
    /// The sending process's `service.name`.
    pub fn service_name(&self) -> Option<String> {
        attribute(&self.resource, "service.name")
    }

    /// A span attribute, rendered as text.
    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }

    /// Everything the span carries, as text: name, attributes, events, links, status and
    /// the sending process's resource. Tests search it for what must never be recorded.
    pub fn text(&self) -> String {
        format!("{:?} {:?}", self.span, self.resource)
    }
}

/// Where each of `secrets` was recorded: the spans (anything they carry, see
/// [`ReceivedSpan::text`]) and the log lines it appears in. Tests assert that there is
/// nothing to report.
pub fn recorded_secrets(
    secrets: &[&str],
    spans: &[ReceivedSpan],
    log_lines: &[String],
) -> Vec<String> {
    let span_texts: Vec<String> = spans.iter().map(ReceivedSpan::text).collect();
    let mut found = Vec::new();
    for secret in secrets {
        for text in span_texts.iter().filter(|text| text.contains(secret)) {
            found.push(format!("{secret:?} in a span: {text}"));
        }
        for line in log_lines.iter().filter(|line| line.contains(secret)) {
            found.push(format!("{secret:?} in a log line: {line}"));
        }
    }
    found
}

/// The spans named `name` that `service` sent.
pub fn named<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.span.name == name && s.service_name().as_deref() == Some(service))
        .collect()
}

/// The one span named `name` that `service` sent; panics unless there is exactly one.
#[track_caller]
pub fn one<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    let found = named(spans, service, name);
    assert_eq!(found.len(), 1, "one {name:?} span from {service}");
    found[0]
}

/// An attribute among `attributes`, rendered as text.
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

#[derive(Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    count: u64,
}

/// The full server, for [`Retain::Spans`]: every span decoded and kept.
struct Collector {
    received: Arc<Mutex<Received>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.received.lock().unwrap_or_else(|e| e.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.count += 1;
                received.spans.push(ReceivedSpan {
                    resource: resource.clone(),
                    span,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The running receiver; it stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    task: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Serves on 127.0.0.1 at a free port, on the current Tokio runtime.
    pub async fn start(retain: Retain) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received::default()));
        let mut server = tonic::transport::Server::builder();
        let router = match retain {
            Retain::Spans => server.add_service(TraceServiceServer::new(Collector {
                received: received.clone(),
            })),
            Retain::CountOnly => {
                server.add_service(span_counter::SpanCounter::new(received.clone()))
            }
        };
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let _ = router.serve_with_incoming(incoming).await;
        });
        Ok(OtlpReceiver {
            addr,
            received,
            task,
        })
    }

    /// The endpoint for an exporter, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far (empty with [`Retain::CountOnly`]).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.lock().spans.clone()
    }

    /// How many spans have arrived.
    pub fn span_count(&self) -> u64 {
        self.lock().count
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Tokio runtime standing in for one process in tests and benchmarks: every thread of
/// it reports to its own subscriber and tracer provider, as `service`, exporting to an
/// OTLP endpoint. Several of them let one test run a client, a coordinator and a worker
/// that each have their own `service.name`.
pub struct TracedRuntime {
    pub runtime: tokio::runtime::Runtime,
    dispatch: tracing::Dispatch,
    telemetry: crate::TelemetryGuard,
}

impl TracedRuntime {
    /// `exporter_runtime` runs the exporter's gRPC channel; it must outlive this runtime's
    /// last [`flush`](Self::flush) and keep running (a multi-threaded runtime). Log lines
    /// (warnings and errors) go to stderr.
    pub fn start(
        service: &str,
        otlp_endpoint: &str,
        exporter_runtime: &tokio::runtime::Runtime,
    ) -> Result<Self, crate::TelemetryError> {
        let options = export_options("warn", otlp_endpoint);
        let (dispatch, telemetry) = {
            let _entered = exporter_runtime.enter();
            crate::build(service, &options)?
        };
        Self::reporting_to(dispatch, telemetry)
    }

    /// [`start`](Self::start), with the log lines that `log_filter` lets through kept in
    /// memory instead of printed, for tests that inspect what a process logs.
    pub fn start_capturing_logs(
        service: &str,
        otlp_endpoint: &str,
        exporter_runtime: &tokio::runtime::Runtime,
        log_filter: &str,
    ) -> Result<(Self, CapturedLogs), crate::TelemetryError> {
        let options = export_options(log_filter, otlp_endpoint);
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let (dispatch, telemetry) = {
            let _entered = exporter_runtime.enter();
            crate::subscriber::build_logging_to(service, &options, move || writer.clone(), false)?
        };
        Ok((Self::reporting_to(dispatch, telemetry)?, logs))
    }

    fn reporting_to(
        dispatch: tracing::Dispatch,
        telemetry: crate::TelemetryGuard,
    ) -> Result<Self, crate::TelemetryError> {
        let for_threads = dispatch.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                // For the thread's whole life: this runtime is this service.
                std::mem::forget(tracing::dispatcher::set_default(&for_threads));
            })
            .build()
            .map_err(crate::TelemetryError::Runtime)?;
        Ok(TracedRuntime {
            runtime,
            dispatch,
            telemetry,
        })
    }

    /// Runs `future` to completion, the calling thread reporting as this service too.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        tracing::dispatcher::with_default(&self.dispatch, || self.runtime.block_on(future))
    }

    /// Exports the spans finished so far, waiting for the export.
    pub fn flush(&self) {
        self.telemetry.flush();
    }
}

fn export_options(log_filter: &str, otlp_endpoint: &str) -> crate::TelemetryOptions {
    crate::TelemetryOptions {
        log_filter: log_filter.to_string(),
        otlp_endpoint: Some(otlp_endpoint.to_string()),
    }
}

/// The log lines a [`TracedRuntime`] wrote, kept in memory.
#[derive(Clone, Default)]
pub struct CapturedLogs {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl CapturedLogs {
    /// Every line written so far.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The collector side of a test that runs several traced "processes" in one: an
/// [`OtlpReceiver`] and the runtime that serves it and runs every process's exporter.
/// Drop the processes first (declare the collector before them).
pub struct TraceCollector {
    receiver: OtlpReceiver,
    runtime: tokio::runtime::Runtime,
}

impl TraceCollector {
    /// Starts the receiver, on a runtime of its own.
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Runtime::new()?;
        let receiver = runtime.block_on(OtlpReceiver::start(Retain::Spans))?;
        Ok(TraceCollector { receiver, runtime })
    }

    /// A new "process" reporting as `service`.
    pub fn process(&self, service: &str) -> Result<TracedRuntime, crate::TelemetryError> {
        TracedRuntime::start(service, &self.receiver.endpoint(), &self.runtime)
    }

    /// A new "process" reporting as `service`, whose log lines at `log_filter` are kept.
    pub fn process_capturing_logs(
        &self,
        service: &str,
        log_filter: &str,
    ) -> Result<(TracedRuntime, CapturedLogs), crate::TelemetryError> {
        TracedRuntime::start_capturing_logs(
            service,
            &self.receiver.endpoint(),
            &self.runtime,
            log_filter,
        )
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.receiver.spans()
    }

    /// Flushes `processes` until the spans received satisfy `complete` or `timeout`
    /// passes, and returns them either way (for the caller's assertions to explain).
    /// Spans of servers end just after their responses, so a client that got its answer
    /// may still have to wait for them.
    pub fn spans_when(
        &self,
        processes: &[&TracedRuntime],
        timeout: std::time::Duration,
        complete: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            for process in processes {
                process.flush();
            }
            let spans = self.spans();
            if complete(&spans) || std::time::Instant::now() >= deadline {
                return spans;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// [`spans_when`](Self::spans_when) for tests whose assertions need every span they
    /// wait for (a search for what must not be recorded passes on too few): panics, listing
    /// the spans that did arrive, if `complete` is still unsatisfied after `timeout`.
    #[track_caller]
    pub fn expect_spans(
        &self,
        processes: &[&TracedRuntime],
        timeout: std::time::Duration,
        complete: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let spans = self.spans_when(processes, timeout, &complete);
        assert!(
            complete(&spans),
            "spans never arrived: {:#?}",
            spans
                .iter()
                .map(|s| (s.service_name(), &s.span.name))
                .collect::<Vec<_>>()
        );
        spans
    }
}

/// kiln's export pipeline (the OTLP/gRPC exporter to `endpoint`, kiln's batching, the
/// service's resource) on its own, without the `tracing` layers: benchmarks make spans on
/// it directly to measure the SDK's own cost per span, the floor under kiln's. Call it
/// inside a Tokio runtime, like [`crate::build`].
pub fn export_pipeline(
    service_name: &str,
    endpoint: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, crate::TelemetryError> {
    crate::subscriber::tracer_provider(service_name, Some(endpoint.to_string()))
}
