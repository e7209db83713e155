#!/usr/bin/env bash
# Interop with kiln's metadata in PostgreSQL and its blobs in Garage, the storage replicas
# share (INTEROP_METADATA=postgres and INTEROP_STORAGE=s3, see lib.sh):
# - bazel_remote.sh: Bazel's remote cache and remote execution on a farm;
# - registry.sh: skopeo, oras-py, then docker, containerd, podman and buildah (with the
#   registry's upload sessions saved at the end of every request, as replicas need).
# Each script makes its own throwaway PostgreSQL cluster (Debian's postgresql package,
# which .ci/run installs) and Garage.
set -euo pipefail
cd "$(dirname "$0")/../.."

for script in bazel_remote.sh registry.sh; do
    echo "== $script with PostgreSQL metadata and Garage blobs"
    INTEROP_METADATA=postgres INTEROP_STORAGE=s3 bash "tests/interop/$script"
done
