//! A client span per outgoing HTTP request (`kiln publish` to a registry), built on the
//! SDK directly (`direct_span`) under the current span. It follows
//! OpenTelemetry's HTTP client conventions: named after the method, kind client,
//! `http.request.method`, `server.address`, `server.port`, `http.response.status_code`,
//! status ERROR for 4xx/5xx and failed sends. No URL, header or body is recorded, so no
//! credential either; its context goes out in the request's `traceparent`.

use http::{HeaderMap, Method};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

use crate::direct_span::{DirectSpan, SpanStart};

/// The span of one outgoing request, from sending it to its response head.
pub struct HttpClientSpan {
    span: Option<DirectSpan>,
}

impl HttpClientSpan {
    /// Starts the span for a request to `host:port` and adds its context to `headers`;
    /// with export off it is nothing and the headers are left alone.
    pub fn start(method: &Method, host: &str, port: u16, headers: &mut HeaderMap) -> Self {
        let span = DirectSpan::start(|| SpanStart {
            name: method.to_string().into(),
            kind: SpanKind::Client,
            parent: crate::current_span::context(),
            attributes: vec![
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("server.address", host.to_string()),
                KeyValue::new("server.port", i64::from(port)),
            ],
        });
        if let Some(span) = &span {
            crate::propagation::inject_into_headers(span.context(), headers);
        }
        HttpClientSpan { span }
    }

    /// Ends the span with the response's status, or as failed when there was none.
    pub fn end(self, status: Option<u16>) {
        let Some(span) = self.span else { return };
        match status {
            Some(status) => {
                span.span().set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 400 {
                    span.fail(status.to_string());
                }
            }
            None => span.fail("the request was not answered"),
        }
        span.end();
    }
}
