//! Compiles kiln's own .proto files, and google.bytestream with `Bytes` payloads. REAPI,
//! google.rpc and the protobuf well-known types are not generated here: `extern_path`
//! points them at the `bazel-remote-apis` crate so that kiln's messages embed the very
//! Rust types the REAPI services use.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build runs whatever PROTOC names; the vendored one needs no system install.
    std::env::set_var("PROTOC", protoc);

    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let well_known_types = protoc_bin_vendored::include_path()?;
    let protos = [
        manifest_dir.join("kiln/worker/v1/worker.proto"),
        manifest_dir.join("kiln/admin/v1/admin.proto"),
    ];
    let includes = [
        manifest_dir.clone(),
        manifest_dir.join("extern"),
        well_known_types,
    ];
    println!("cargo:rerun-if-changed=kiln");
    println!("cargo:rerun-if-changed=extern");

    tonic_prost_build::configure()
        // Stops prost mapping google.protobuf to prost-types, so the extern_path below
        // applies; the well-known types are only imported, so nothing extra is generated.
        .compile_well_known_types(true)
        // No generated `WorkersClient::connect(url)`: it would clash with the Connect RPC's
        // method; callers build every client from a Channel.
        .build_transport(false)
        .extern_path(
            ".build.bazel.remote.execution.v2",
            "::bazel_remote_apis::build::bazel::remote::execution::v2",
        )
        .extern_path(".google.rpc", "::bazel_remote_apis::google::rpc")
        .extern_path(".google.protobuf", "::bazel_remote_apis::google::protobuf")
        .compile_protos(&protos, &includes)?;

    // google.bytestream, with `bytes::Bytes` for its payloads (prost's default is Vec<u8>,
    // a copy of every chunk on decode and on the way into a message).
    println!("cargo:rerun-if-changed=google");
    tonic_prost_build::configure()
        .build_transport(false)
        .bytes(".google.bytestream")
        .compile_protos(
            &[manifest_dir.join("google/bytestream/bytestream.proto")],
            std::slice::from_ref(&manifest_dir),
        )?;
    Ok(())
}
