#!/usr/bin/env bash
# Interop on a farm: three kiln replicas behind Debian's HAProxy, their metadata in
# PostgreSQL and their blobs in Garage (INTEROP_REPLICAS=3, INTEROP_METADATA=postgres,
# INTEROP_STORAGE=s3; see lib.sh and replicas.sh). Every client uses the balancer only:
# - bazel_remote.sh: Bazel's remote cache and remote execution, three coordinator
#   replicas, one elected leader, the workers joined through the balancer;
# - kiln_run.sh: `kiln run --shards 4`, each shard executed exactly once;
# - registry.sh: skopeo, oras-py, then docker, containerd, podman and buildah, on three
#   `kiln registry` replicas (HTTP, each request balanced on its own, so one chunked
#   upload's requests land on different replicas).
# Each script makes its own throwaway PostgreSQL cluster (Debian's postgresql package,
# which .ci/run installs) and Garage.
set -euo pipefail
cd "$(dirname "$0")/../.."

for script in bazel_remote.sh kiln_run.sh registry.sh; do
    echo "== $script on three replicas, PostgreSQL metadata and Garage blobs"
    INTEROP_REPLICAS=3 INTEROP_METADATA=postgres INTEROP_STORAGE=s3 bash "tests/interop/$script"
done
