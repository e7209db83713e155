//! `--otlp`: a benchmark with span export on, to an OTLP receiver in the same process, so
//! that its figures can be set against the same benchmark with export off.

use kiln_telemetry::receiver::{OtlpReceiver, Retain};
use kiln_telemetry::{TelemetryGuard, TelemetryOptions};

/// The benchmark process's tracing: log lines as `RUST_LOG` says (errors by default) and,
/// with `--otlp`, every kiln span exported over OTLP/gRPC to a counting receiver.
pub struct BenchTracing {
    receiver: Option<OtlpReceiver>,
    guard: TelemetryGuard,
}

impl BenchTracing {
    /// Installs the global subscriber; call it inside the runtime.
    pub async fn install(otlp: bool) -> anyhow::Result<Self> {
        let receiver = match otlp {
            true => Some(OtlpReceiver::start(Retain::CountOnly).await?),
            false => None,
        };
        let options = TelemetryOptions {
            log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            otlp_endpoint: receiver.as_ref().map(OtlpReceiver::endpoint),
        };
        let guard = kiln_telemetry::init("kiln-bench", &options)?;
        Ok(BenchTracing { receiver, guard })
    }

    /// "export on (N spans received)" or "export off", after flushing what is left.
    pub async fn finish(self) -> anyhow::Result<String> {
        let BenchTracing { receiver, guard } = self;
        // Shutting the exporter down blocks until its last batch is sent through this
        // runtime; keep it off the async workers.
        tokio::task::spawn_blocking(move || drop(guard)).await?;
        Ok(match receiver {
            Some(receiver) => format!("export on ({} spans received)", receiver.span_count()),
            None => "export off".to_string(),
        })
    }
}
