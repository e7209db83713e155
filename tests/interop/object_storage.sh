#!/usr/bin/env bash
# Interop on object storage: the clients' scripts again, with every kiln keeping its blobs
# in a real Garage bucket (INTEROP_STORAGE=s3, see lib.sh) behind its local tier:
# - bazel.sh: Bazel's remote cache (a 6 MiB local tier in front of the bucket: the
#   rebuild is all hits, served from the bucket);
# - bazel_remote.sh: Bazel's remote cache and remote execution on a farm;
# - registry.sh: skopeo, oras-py, then docker, containerd, podman and buildah;
# - publish.sh: kiln run, kiln publish, then ctr and docker run the image.
# Each script checks at its end that the bucket holds what it wrote. Garage is installed
# when missing (about 7 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v garage >/dev/null && [ ! -x "$HOME/.cargo/bin/garage" ]; then
    echo "== installing garage 2.5.0"
    cargo install garage --version 2.5.0 --locked --quiet
fi
for script in bazel.sh bazel_remote.sh registry.sh publish.sh; do
    echo "== $script on Garage"
    INTEROP_STORAGE=s3 bash "tests/interop/$script"
done
