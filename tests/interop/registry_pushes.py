"""Registry pushes that may meet a failing replica, and their check afterwards.

    registry_pushes.py push HOST COUNT LEDGER MAJOR   pushes COUNT images tagged
        vMAJOR.0.0 … (semver tags are immutable: each round needs its own MAJOR), each a
        random 3 MiB layer sent as a chunked upload (POST, three PATCHes, PUT) and a
        manifest, and appends every acknowledged one (the manifest PUT answered 201) to
        LEDGER;
    registry_pushes.py check HOST LEDGER        pulls every image in LEDGER back and
        compares manifest and layer digests.

A request that fails (a connection reset, a 5xx from the balancer or a replica) is retried
as a client would: the image's upload starts over, with a growing pause, for up to about
a minute per image. Only the
standard library, so that it runs wherever python3 does.
"""

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request


def request(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(host, repo, data, chunks=3):
    status, headers, _ = request("POST", f"http://{host}/v2/{repo}/blobs/uploads/")
    if status != 202:
        raise IOError(f"POST upload: {status}")
    location = headers.get("Location")
    step = -(-len(data) // chunks)
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        url = location if location.startswith("http") else f"http://{host}{location}"
        status, headers, _ = request(
            "PATCH",
            url,
            piece,
            {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(piece) - 1}",
            },
        )
        if status != 202:
            raise IOError(f"PATCH: {status}")
        location = headers.get("Location")
    url = location if location.startswith("http") else f"http://{host}{location}"
    sep = "&" if "?" in url else "?"
    status, _, _ = request("PUT", f"{url}{sep}digest={digest(data)}")
    if status != 201:
        raise IOError(f"PUT upload: {status}")


def push_image(host, repo, tag):
    layer = os.urandom(3 << 20)
    config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
    push_blob(host, repo, config, chunks=1)
    push_blob(host, repo, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    status, _, _ = request(
        "PUT",
        f"http://{host}/v2/{repo}/manifests/{tag}",
        manifest,
        {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    if status != 201:
        raise IOError(f"PUT manifest: {status}")
    return digest(manifest), digest(layer)


def push(host, count, ledger, major):
    retries = 0
    for i in range(count):
        for attempt in range(30):
            try:
                manifest, layer = push_image(host, "faults/app", f"v{major}.0.{i}")
                break
            except (IOError, OSError) as e:
                if attempt == 29:
                    raise
                retries += 1
                print(f"push {i}: {e}; retrying", file=sys.stderr)
                time.sleep(min(0.25 * (attempt + 1), 2.0))
        with open(ledger, "a") as f:
            f.write(f"v{major}.0.{i} {manifest} {layer}\n")
    print(f"pushed {count} images, {retries} retries")


def check(host, ledger):
    checked = 0
    for line in open(ledger):
        tag, manifest, layer = line.split()
        status, _, body = request(
            "GET",
            f"http://{host}/v2/faults/app/manifests/{tag}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert status == 200 and digest(body) == manifest, f"{tag}: manifest {status}"
        status, _, body = request("GET", f"http://{host}/v2/faults/app/blobs/{layer}")
        assert status == 200 and digest(body) == layer, f"{tag}: layer {status}"
        checked += 1
    print(f"every acknowledged push reads back: {checked} images")


if __name__ == "__main__":
    if sys.argv[1] == "push":
        push(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        check(sys.argv[2], sys.argv[3])
