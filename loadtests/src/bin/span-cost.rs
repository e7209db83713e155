//! CPU per exported span (issue 6): what one request's span costs kiln with export on,
//! against the OpenTelemetry SDK's own span through the same exporter, the floor that no
//! code on top of the SDK can go under.
//!
//! `cargo build --release -p kiln-loadtests && loadtests/span-cost.sh`
//!
//! One kind of span per run (`--kind`), `--spans` of them made one after another on a
//! thread of their own, flushed every few thousand; the spans go over OTLP/gRPC to the counting receiver
//! of the `--otlp` benchmarks, whose CPU is left out (it stands in for a collector on
//! another machine). Reported per span: the CPU of the thread making the spans ("on the
//! request path") and of the whole process but the receiver ("in all": the batch thread's
//! encoding and the gRPC client's sending included).

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use kiln_loadtests::load::{process_cpu_time, thread_cpu_time};
use kiln_loadtests::span_export::BenchTracing;
use kiln_telemetry::HttpServerSpan;
use opentelemetry::trace::{Span as _, SpanKind, Tracer, TracerProvider as _};
use opentelemetry::KeyValue;

/// The registry's hottest route, whose requests the spans stand for.
const ROUTE: &str = "/v2/{name}/manifests/{reference}";
const SPAN_NAME: &str = "GET /v2/{name}/manifests/{reference}";
const BODY: &[u8] = &[b'x'; 527];

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// Export off: kiln's request-span code finds no exporter and makes nothing.
    Off,
    /// kiln's registry request span (`HttpServerSpan`): start, the handler run under
    /// it, the response recorded, ended when the body has been sent.
    Request,
    /// The same request as a `tracing` span carried by `tracing-opentelemetry`, the way
    /// kiln's rarer spans are made (and its per-stage spans were, until they moved to the
    /// SDK).
    Tracing,
    /// An SDK span with the request span's attributes, made directly on the SDK tracer.
    SdkAttributes,
    /// A bare SDK span: a static name, no attributes, started and ended.
    SdkBare,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    kind: Kind,
    /// Spans to make.
    #[arg(long, default_value_t = 200_000)]
    spans: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let export = BenchTracing::install(args.kind != Kind::Off).await?;
    // The SDK kinds get a provider of their own: kiln's export pipeline, without kiln's
    // span code, to the same receiver.
    let sdk = match (args.kind, export.receiver_endpoint()) {
        (Kind::SdkAttributes | Kind::SdkBare, Some(endpoint)) => Some(
            kiln_telemetry::receiver::export_pipeline("kiln-bench-sdk", &endpoint)?,
        ),
        _ => None,
    };

    let cpu_before = process_cpu_time();
    let receiver_before = export.receiver_cpu().await;
    let started = Instant::now();
    let tracer = sdk.as_ref().map(|p| p.tracer("span-cost"));
    // Waits until every span ended so far has been encoded and sent.
    let flush = || match &sdk {
        Some(provider) => provider.force_flush().map_err(anyhow::Error::from),
        None => {
            export.flush();
            Ok(())
        }
    };
    let on_path = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| make_spans(args.kind, args.spans, tracer.as_ref(), &flush))
                .join()
                .map_err(|_| anyhow::anyhow!("the span thread panicked"))?
        })
    })?;
    let elapsed = started.elapsed();
    let receiver = export.receiver_cpu().await - receiver_before;
    let in_all = process_cpu_time() - cpu_before - receiver;
    if let Some(provider) = sdk {
        tokio::task::block_in_place(|| provider.shutdown())?;
    }
    let received = export.finish().await?;

    let per_span = |cpu: Duration| cpu.as_secs_f64() * 1e9 / args.spans as f64;
    println!("| kind | spans | seconds | ns CPU per span, on the request path | ns CPU per span, in all (without the receiver) | receiver ns per span |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.2} | {:.0} | {:.0} | {:.0} |",
        args.kind
            .to_possible_value()
            .expect("no skipped kinds")
            .get_name(),
        args.spans,
        elapsed.as_secs_f64(),
        per_span(on_path),
        per_span(in_all),
        per_span(receiver),
    );
    println!("tracing: {received}");
    Ok(())
}

/// Spans made between flushes: half the export queue, so that none is dropped for want of
/// room (a burst beyond the queue would be, and its encoding would go unmeasured).
const BURST: u64 = 8_192;

/// Makes the spans on the calling thread, flushing after every burst and at the end;
/// returns the thread's CPU time.
fn make_spans(
    kind: Kind,
    spans: u64,
    tracer: Option<&opentelemetry_sdk::trace::SdkTracer>,
    flush: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    // Handlers and bodies are futures; this runtime polls them, on this thread only.
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let headers = http::HeaderMap::new();
    let start = thread_cpu_time();
    for made in 1..=spans {
        match kind {
            Kind::Off | Kind::Request => runtime.block_on(request_span(&headers)),
            Kind::Tracing => tracing_span(),
            Kind::SdkAttributes => {
                let tracer = tracer.expect("an SDK tracer");
                let mut span = tracer
                    .span_builder(SPAN_NAME)
                    .with_kind(SpanKind::Server)
                    .with_attributes([
                        KeyValue::new("http.request.method", "GET"),
                        KeyValue::new("http.route", ROUTE),
                    ])
                    .start(tracer);
                span.set_attribute(KeyValue::new("http.response.status_code", 200));
                span.set_attribute(KeyValue::new("http.response.body.size", BODY.len() as i64));
                span.end();
            }
            Kind::SdkBare => {
                let tracer = tracer.expect("an SDK tracer");
                tracer.start(SPAN_NAME).end();
            }
        }
        if made % BURST == 0 || made == spans {
            flush()?;
        }
    }
    Ok(thread_cpu_time() - start)
}

/// One request's span the way the registry makes it.
async fn request_span(headers: &http::HeaderMap) {
    let span = HttpServerSpan::start(&http::Method::GET, ROUTE, headers);
    let handler = async { http::Response::new(Full::new(bytes::Bytes::from_static(BODY))) };
    let response = match &span {
        Some(span) => span.instrument(handler).await,
        None => handler.await,
    };
    let body = match span {
        Some(span) => span.respond(response).into_body().collect().await,
        None => response.into_body().collect().await.map_err(|e| match e {}),
    };
    std::hint::black_box(body.map(|b| b.to_bytes()).ok());
}

/// One request's span as a `tracing` span with the same fields.
fn tracing_span() {
    let span = tracing::debug_span!(
        target: "kiln_span_cost",
        "request",
        otel.name = SPAN_NAME,
        otel.kind = "server",
        http.request.method = "GET",
        http.route = ROUTE,
        http.response.status_code = tracing::field::Empty,
        http.response.body.size = tracing::field::Empty,
    );
    span.in_scope(|| {
        span.record("http.response.status_code", 200);
        span.record("http.response.body.size", BODY.len());
    });
}
