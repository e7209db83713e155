//! One publish, one trace: `kiln publish --from-action`, the coordinator it reads the
//! action's outputs from and the registry it pushes to each have their own tracer
//! provider and `service.name` (as separate processes would), exporting to an in-process
//! OTLP receiver. The coordinator's and the registry's spans must join the publish's
//! trace, and no credential may appear in any span.
//! A test binary of its own: it owns the tracing dispatchers of its process.

mod support;

use std::time::Duration;

use kiln_publish::{
    publish, Compression, CoordinatorSource, CredentialStore, Credentials, LayerContent,
    Provenance, PublishRequest, RuntimeSettings,
};
use kiln_telemetry::receiver::{named, one, recorded_secrets, ReceivedSpan, TraceCollector};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use support::fake_action::{cas, FakeAction, FUNCTION};
use support::kiln_servers::{self, PASSWORD, USER};

const MANIFEST_PUT: &str = "PUT /v2/{name}/manifests/{reference}";
const GET_ACTION_RESULT: &str = "build.bazel.remote.execution.v2.ActionCache/GetActionResult";

#[test]
fn a_publish_is_one_trace_across_coordinator_and_registry() {
    let collector = TraceCollector::start().expect("the receiver starts");
    let process = |service| collector.process(service).expect("telemetry starts");
    let coordinator_process = process("kiln-coordinator");
    let registry_process = process("kiln-registry");
    let publish_process = process("kiln-publish");

    let coordinator = coordinator_process.block_on(kiln_servers::coordinator());
    let registry = registry_process.block_on(kiln_servers::registry(true));
    let stored = publish_process.block_on(async {
        FakeAction::default()
            .file("bin/app", b"#!/bin/sh\necho traced\n", true)
            .store(&cas(&coordinator.address).await, "traced", true)
            .await
    });
    let content = LayerContent::from_action(
        CoordinatorSource {
            address: format!("grpc://{}", coordinator.address),
            instance_name: String::new(),
            digest_function: FUNCTION,
            credentials: None,
            tls: Default::default(),
        },
        &stored.action.reapi(),
    )
    .unwrap();
    let outcome = publish_process
        .block_on(publish(PublishRequest {
            registry: registry.address.clone(),
            insecure: false,
            registry_tls: Default::default(),
            repository: "traced/app".into(),
            content,
            content_description: "from an action".into(),
            base: None,
            compression: Compression::Gzip,
            runtime: RuntimeSettings::default(),
            provenance: Provenance::default(),
            tags: vec!["abc1234".into()],
            credentials: CredentialStore {
                explicit: Some(Credentials {
                    username: USER.into(),
                    password: PASSWORD.into(),
                }),
                docker_config: None,
                ..Default::default()
            },
            progress: Default::default(),
        }))
        .expect("the image is published");
    assert_eq!(outcome.tags_pushed, ["abc1234"]);

    let spans = collector.spans_when(
        &[&publish_process, &coordinator_process, &registry_process],
        Duration::from_secs(20),
        |spans| {
            named(spans, "kiln-registry", MANIFEST_PUT).len() == 2
                && !named(spans, "kiln-publish", "publish").is_empty()
        },
    );

    let root = one(&spans, "kiln-publish", "publish");
    assert!(
        root.span.parent_span_id.is_empty(),
        "the publish is the root"
    );
    assert_eq!(root.attribute("repository").as_deref(), Some("traced/app"));
    let trace = &root.span.trace_id;

    // Every registry request (a span named `METHOD ROUTE`): the token, the blob checks and
    // uploads, both manifest PUTs.
    let requests: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service_name().as_deref() == Some("kiln-registry"))
        .filter(|s| s.span.name.contains(" /"))
        .collect();
    for name in [
        "GET /token",
        "HEAD /v2/{name}/blobs/{digest}",
        "POST /v2/{name}/blobs/uploads/",
        "PUT /v2/{name}/blobs/uploads/{id}",
        MANIFEST_PUT,
    ] {
        assert!(
            requests.iter().any(|s| s.span.name == name),
            "no {name:?} span among {:?}",
            requests.iter().map(|s| &s.span.name).collect::<Vec<_>>()
        );
    }
    for request in &requests {
        assert_eq!(
            &request.span.trace_id, trace,
            "{:?} is not in the publish's trace",
            request.span.name
        );
        // Its parent is the publish's client span for that request, under the publish.
        let sent = spans
            .iter()
            .find(|s| s.span.span_id == request.span.parent_span_id)
            .unwrap_or_else(|| panic!("no parent for {:?}", request.span.name));
        assert_eq!(sent.service_name().as_deref(), Some("kiln-publish"));
        assert_eq!(sent.span.kind, SpanKind::Client as i32);
        let method = request.span.name.split(' ').next();
        assert_eq!(Some(sent.span.name.as_str()), method);
        assert_eq!(
            sent.attribute("http.response.status_code"),
            request.attribute("http.response.status_code"),
            "both sides of {:?} saw the same status",
            request.span.name
        );
        assert_eq!(sent.span.parent_span_id, root.span.span_id);
    }

    // The coordinator served the action's result within the same trace.
    let served = one(&spans, "kiln-coordinator", GET_ACTION_RESULT);
    assert_eq!(&served.span.trace_id, trace);

    let leaks = recorded_secrets(&[PASSWORD], &spans, &[]);
    assert!(leaks.is_empty(), "the password leaked: {leaks:#?}");
}
