"""The invariants kiln's deployment files must keep, as functions over parsed data.

Each rule takes already-parsed input (a Kubernetes object, a resolved compose file, a
parsed Dockerfile, the text of a values file) and returns a list of violation messages.
The driver (check_deploy.py) finds the files, runs the real tools (Helm, docker-compose,
the Kubernetes schemas) and reports. Nothing here reads files or runs processes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from typing import Any

SHA256_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
KILN_ROLES_WITH_STORE = {"up", "coordinator", "registry"}
KILN_DATA_DIR = "/var/lib/kiln"

# Workload kinds and where their pod spec lives.
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
# Run-to-completion workloads need no liveness/readiness probes.
BATCH_KINDS = {"Job", "CronJob"}


def dig(data: Any, *path: str, default: Any = None) -> Any:
    """data[path[0]][path[1]]…, or `default` when any step is missing."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def object_name(obj: dict) -> str:
    return f"{obj.get('kind', '?')}/{dig(obj, 'metadata', 'name', default='?')}"


# ---------------------------------------------------------------- image references


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference such as `host:5000/a/b:v1@sha256:…`."""
    name, _, digest = ref.partition("@")
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def image_violations(ref: Any) -> list[str]:
    """An image must be pinned: a digest, or a tag that is not `latest`."""
    if not isinstance(ref, str) or not ref.strip():
        return [f"image reference {ref!r} is empty or not a string"]
    if "${" in ref or "{{" in ref:
        return [f"image reference {ref!r} is unresolved"]
    _, tag, digest = split_image(ref)
    problems = []
    if digest is not None and not SHA256_DIGEST.match(digest):
        problems.append(f"image {ref!r} has a malformed digest (want sha256:<64 hex>)")
    if tag == "latest":
        problems.append(f"image {ref!r} uses the floating tag latest")
    elif tag is None and digest is None:
        problems.append(f"image {ref!r} has no tag or digest (implicitly latest)")
    return problems


def latest_violations(data: Any, path: str = "") -> list[str]:
    """Every `tag: latest` and every `…:latest` string anywhere in a YAML document."""
    problems = []
    for where, key, value in walk_scalars(data, path):
        if not isinstance(value, str):
            continue
        if key in ("tag", "imageTag") and value.strip() == "latest":
            problems.append(f"{where}: tag is latest")
        elif re.search(r"[\w./-]:latest(@|$)", value.strip()):
            problems.append(f"{where}: image {value.strip()!r} uses the floating tag latest")
    return problems


def walk_scalars(data: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from walk_scalars_child(value, f"{path}.{key}" if path else str(key), str(key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from walk_scalars_child(value, f"{path}[{index}]", "")


def walk_scalars_child(value: Any, where: str, key: str) -> Iterator[tuple[str, str, Any]]:
    if isinstance(value, (dict, list)):
        yield from walk_scalars(value, where)
    else:
        yield where, key, value


# ---------------------------------------------------------------- Kubernetes workloads


def pod_spec(obj: dict) -> dict | None:
    path = POD_SPEC_PATHS.get(obj.get("kind", ""))
    return dig(obj, *path) if path else None


def is_kiln_container(container: dict) -> bool:
    """kiln's own containers: they read KILN_* settings or run kiln's image."""
    env_names = [e.get("name", "") for e in container.get("env") or []]
    repository, _, _ = split_image(str(container.get("image", "")))
    return any(n.startswith("KILN_") for n in env_names) or repository.rsplit("/", 1)[-1] == "kiln"


def kiln_role(container: dict) -> str | None:
    """The kiln subcommand a container runs (`up`, `worker`, …), from args or command."""
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    if argv and argv[0] in ("kiln", "/usr/local/bin/kiln", "/kiln"):
        argv = argv[1:]
    return argv[0] if argv and is_kiln_container(container) else None


def workload_violations(obj: dict) -> list[str]:
    """Non-root, pinned images, resources and probes for every container of a workload."""
    spec = pod_spec(obj)
    if spec is None:
        return []
    name = object_name(obj)
    problems = []
    pod_sc = spec.get("securityContext") or {}
    long_running = obj["kind"] not in BATCH_KINDS
    containers = [("container", c) for c in spec.get("containers") or []]
    containers += [("initContainer", c) for c in spec.get("initContainers") or []]
    if not containers:
        problems.append(f"{name}: no containers")
    for what, container in containers:
        where = f"{name} {what} {container.get('name', '?')}"
        problems += [f"{where}: {p}" for p in container_violations(container, pod_sc)]
        if what == "container" and long_running:
            for probe in ("livenessProbe", "readinessProbe"):
                if not container.get(probe):
                    problems.append(f"{where}: no {probe}")
    if (
        any(is_kiln_container(c) for _, c in containers)
        and spec.get("enableServiceLinks") is not False
    ):
        problems.append(
            f"{name}: enableServiceLinks must be false (service links inject KILN_* "
            "variables that kiln rejects as unknown)"
        )
    problems += kiln_role_violations(obj, spec)
    return problems


def container_violations(container: dict, pod_sc: dict) -> list[str]:
    problems = image_violations(container.get("image"))
    sc = container.get("securityContext") or {}

    def effective(key: str) -> Any:
        return sc[key] if key in sc else pod_sc.get(key)

    if effective("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    uid = effective("runAsUser")
    if not isinstance(uid, int) or uid == 0:
        problems.append(f"runAsUser must be a non-zero uid, got {uid!r}")
    if sc.get("privileged") is True:
        problems.append("runs privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    resources = container.get("resources") or {}
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if not dig(resources, kind, resource):
                problems.append(f"resources.{kind}.{resource} is not set")
    return problems


def kiln_role_violations(obj: dict, spec: dict) -> list[str]:
    """Role-specific rules: workers drain on shutdown, servers keep their store."""
    name = object_name(obj)
    problems = []
    for container in spec.get("containers") or []:
        role = kiln_role(container)
        where = f"{name} container {container.get('name', '?')} (kiln {role})"
        if role == "worker":
            if not dig(container, "lifecycle", "preStop"):
                problems.append(f"{where}: no preStop drain hook")
            grace = spec.get("terminationGracePeriodSeconds")
            if not isinstance(grace, int) or grace < 60:
                problems.append(
                    f"{where}: terminationGracePeriodSeconds must give running actions time "
                    f"to finish (>= 60), got {grace!r}"
                )
        elif (
            role in KILN_ROLES_WITH_STORE
            and obj["kind"] != "Pod"
            and not data_dir_is_persistent(obj, spec, container)
        ):
            problems.append(f"{where}: {KILN_DATA_DIR} is not on a persistent volume")
    return problems


def data_dir_is_persistent(obj: dict, spec: dict, container: dict) -> bool:
    claims = {
        dig(t, "metadata", "name")
        for t in dig(obj, "spec", "volumeClaimTemplates", default=[]) or []
    }
    claims |= {v["name"] for v in spec.get("volumes") or [] if "persistentVolumeClaim" in v}
    return any(
        m.get("mountPath") == KILN_DATA_DIR and m.get("name") in claims
        for m in container.get("volumeMounts") or []
    )


# ---------------------------------------------------------------- custom resources


def scale_target_violations(obj: dict, deployments: set[str]) -> list[str]:
    """An autoscaler must scale a Deployment defined alongside it."""
    target = dig(obj, "spec", "scaleTargetRef", "name")
    if target not in deployments:
        return [
            f"{object_name(obj)}: scaleTargetRef {target!r} is not a Deployment defined alongside it"
        ]
    return []


def scaled_object_violations(obj: dict, deployments: set[str]) -> list[str]:
    name = object_name(obj)
    problems = scale_target_violations(obj, deployments)
    triggers = dig(obj, "spec", "triggers", default=[]) or []
    if not any(
        t.get("type") == "prometheus"
        and "kiln_queue_depth" in str(dig(t, "metadata", "query", default=""))
        for t in triggers
    ):
        problems.append(f"{name}: no prometheus trigger on kiln_queue_depth")
    for trigger in triggers:
        for key in ("serverAddress", "query", "threshold"):
            if not dig(trigger, "metadata", key):
                problems.append(f"{name}: trigger {trigger.get('type')!r} has no metadata.{key}")
    low, high = dig(obj, "spec", "minReplicaCount"), dig(obj, "spec", "maxReplicaCount")
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
        problems.append(f"{name}: replica bounds {low!r}..{high!r} are not 0 <= min <= max")
    return problems


def hpa_violations(obj: dict, deployments: set[str]) -> list[str]:
    name = object_name(obj)
    problems = scale_target_violations(obj, deployments)
    metrics = dig(obj, "spec", "metrics", default=[]) or []
    if not any(dig(m, "external", "metric", "name") == "kiln_queue_depth" for m in metrics):
        problems.append(f"{name}: no External metric kiln_queue_depth")
    return problems


def service_monitor_violations(obj: dict, services: list[dict]) -> list[str]:
    """The selector must match a Service that has the scraped port name."""
    name = object_name(obj)
    selector = dig(obj, "spec", "selector", "matchLabels", default={}) or {}
    ports = {e.get("port") for e in dig(obj, "spec", "endpoints", default=[]) or []}
    for service in services:
        labels = dig(service, "metadata", "labels", default={}) or {}
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            service_ports = {p.get("name") for p in dig(service, "spec", "ports", default=[]) or []}
            if ports <= service_ports:
                return []
    return [
        f"{name}: no Service matches selector {selector} with port(s) {sorted(map(str, ports))}"
    ]


def image_repository_violations(obj: dict) -> list[str]:
    image = str(dig(obj, "spec", "image", default=""))
    _, tag, digest = split_image(image)
    if not image or tag or digest:
        return [
            f"{object_name(obj)}: spec.image must be a repository without tag or digest, got {image!r}"
        ]
    return []


# kiln publish --tags-from-git pushes these three kinds of tag for one build.
KILN_RELEASE_TAGS = ["v0.1.0", "v1.20.3"]
KILN_NON_RELEASE_TAGS = ["abc1234", "main-abc1234", "feature-x-abc1234", "latest", "v1.2"]


def image_policy_violations(obj: dict, repositories: set[str]) -> list[str]:
    """The policy must pick kiln's vX.Y.Z release tags by semver and nothing else."""
    name = object_name(obj)
    problems = []
    ref = dig(obj, "spec", "imageRepositoryRef", "name")
    if ref not in repositories:
        problems.append(f"{name}: imageRepositoryRef {ref!r} is not an ImageRepository here")
    if not dig(obj, "spec", "policy", "semver", "range"):
        problems.append(f"{name}: policy.semver.range is not set")
    pattern = dig(obj, "spec", "filterTags", "pattern")
    if pattern:
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            return problems + [f"{name}: filterTags.pattern does not compile: {e}"]
        problems += [
            f"{name}: filterTags.pattern rejects release tag {tag!r}"
            for tag in KILN_RELEASE_TAGS
            if not compiled.search(tag)
        ]
        problems += [
            f"{name}: filterTags.pattern accepts non-release tag {tag!r}"
            for tag in KILN_NON_RELEASE_TAGS
            if compiled.search(tag)
        ]
    return problems


def application_values_violations(obj: dict) -> list[str]:
    """An Argo CD Application deploying kiln pins the image by digest."""
    name = object_name(obj)
    values = dig(obj, "spec", "source", "helm", "valuesObject")
    if not isinstance(values, dict):
        return [f"{name}: spec.source.helm.valuesObject is missing"]
    digest = dig(values, "image", "digest")
    problems = []
    if not isinstance(digest, str) or not SHA256_DIGEST.match(digest):
        problems.append(
            f"{name}: image.digest must pin the image (sha256:<64 hex>), got {digest!r}"
        )
    if dig(values, "image", "tag") == "latest":
        problems.append(f"{name}: image.tag is latest")
    revision = dig(obj, "spec", "source", "targetRevision")
    if revision in (None, "", "HEAD"):
        problems.append(
            f"{name}: targetRevision {revision!r} follows a moving branch; pin a tag or commit"
        )
    return problems


# ---------------------------------------------------------------- compose


def compose_violations(config: dict) -> list[str]:
    """Rules for a compose file as `docker-compose config` resolved it."""
    problems = []
    services = config.get("services") or {}
    if not services:
        problems.append("compose file has no services")
    for name, service in services.items():
        where = f"service {name}"
        if "image" not in service:
            problems.append(f"{where}: no pinned image (build-only services are not allowed)")
        else:
            problems += [f"{where}: {p}" for p in image_violations(service["image"])]
        user = str(service.get("user", ""))
        uid = user.split(":", 1)[0]
        if not uid.isdigit() or int(uid) == 0:
            problems.append(f"{where}: user must be a numeric non-root uid, got {user!r}")
        if service.get("privileged") is True:
            problems.append(f"{where}: runs privileged")
        health = service.get("healthcheck") or {}
        if (
            not health
            or health.get("disable") is True
            or (health.get("test") or ["NONE"])[0] == "NONE"
        ) and not is_awaited_one_shot(name, service, services):
            problems.append(f"{where}: no healthcheck")
            if is_one_shot(service):
                problems.append(
                    f'{where}: one-shot (restart: "no") but no service waits for it to '
                    "complete (depends_on condition service_completed_successfully)"
                )
        limits = dig(service, "deploy", "resources", "limits", default={}) or {}
        if not (limits.get("cpus") or service.get("cpus")):
            problems.append(f"{where}: no CPU limit")
        if not (limits.get("memory") or service.get("mem_limit")):
            problems.append(f"{where}: no memory limit")
        role = compose_kiln_role(service)
        if role in KILN_ROLES_WITH_STORE and not any(
            is_named_volume_at(v, KILN_DATA_DIR) for v in service.get("volumes") or []
        ):
            problems.append(
                f"{where}: kiln {role} keeps its store in {KILN_DATA_DIR}; mount a named volume there"
            )
    return problems


def is_named_volume_at(volume: Any, target: str) -> bool:
    """A compose volume entry (short or long syntax) that puts a named volume at target."""
    if isinstance(volume, dict):
        return volume.get("type") == "volume" and volume.get("target") == target
    source, _, rest = str(volume).partition(":")
    return rest.split(":")[0] == target and not source.startswith((".", "/", "~"))


# kiln roles that run until stopped: never one-shot, whatever their restart policy says.
KILN_LONG_RUNNING_ROLES = KILN_ROLES_WITH_STORE | {"worker"}
# The kiln servers: what a balancer in front of them balances, by port.
KILN_GRPC_ROLES = {"up", "coordinator"}
KILN_REGISTRY_ROLES = {"up", "registry"}


def compose_argv(service: dict) -> list[str]:
    command = service.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    return [str(a) for a in command]


def compose_kiln_role(service: dict) -> str | None:
    """The kiln subcommand a compose service runs (`up`, `worker`, …), from its command."""
    argv = compose_argv(service)
    if argv and argv[0] in ("kiln", "/usr/local/bin/kiln", "/kiln"):
        argv = argv[1:]
    return argv[0] if argv else None


def is_one_shot(service: dict) -> bool:
    return service.get("restart") in ("no", False)


def is_awaited_one_shot(name: str, service: dict, services: dict) -> bool:
    """A run-to-completion service (an init step) needs no healthcheck when another
    service starts only once it has completed: its exit status is its health. kiln's
    own long-running roles never qualify."""
    if not is_one_shot(service) or compose_kiln_role(service) in KILN_LONG_RUNNING_ROLES:
        return False
    for other in services.values():
        depends = other.get("depends_on") or {}
        if (
            isinstance(depends, dict)
            and dig(depends, name, "condition") == "service_completed_successfully"
        ):
            return True
    return False


def compose_environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    return {str(k): "" if v is None else str(v) for k, v in environment.items()}


def kiln_setting(service: dict, flag: str, variable: str) -> str | None:
    """A kiln setting as a compose service gives it: the flag in its command (which wins,
    as in kiln), else the variable in its environment."""
    argv = compose_argv(service)
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return compose_environment(service).get(variable)


def address_port(address: str | None, default: int) -> int:
    if not address:
        return default
    port = address.rsplit(":", 1)[-1]
    return int(port) if port.isdigit() else default


def kiln_ports(service: dict) -> dict[str, int | None]:
    """The ports a kiln server serves in its container: gRPC, the registry, metrics."""
    role = compose_kiln_role(service)
    grpc = kiln_setting(service, "--grpc-addr", "KILN_GRPC_ADDR")
    registry = kiln_setting(service, "--registry-addr", "KILN_REGISTRY_ADDR")
    metrics = kiln_setting(service, "--metrics-addr", "KILN_METRICS_ADDR")
    return {
        "gRPC": address_port(grpc, 8980) if role in KILN_GRPC_ROLES else None,
        "registry": address_port(registry, 5000) if role in KILN_REGISTRY_ROLES else None,
        "metrics": address_port(metrics, 9091 if role == "registry" else 9090),
    }


def kiln_servers(config: dict) -> dict[str, dict]:
    return {
        name: service
        for name, service in (config.get("services") or {}).items()
        if compose_kiln_role(service) in KILN_ROLES_WITH_STORE
    }


def farm_violations(config: dict, kiln_configs: dict[str, dict | None]) -> list[str]:
    """Several kiln servers in one compose file must share their stores, metadata in
    PostgreSQL and blobs in a bucket, and several coordinators must be one farm: each a
    replica whose advertise URL names its own service and gRPC port (the others forward
    to the leader there).

    kiln_configs maps a service to its parsed KILN_CONFIG file, or None when it sets
    KILN_CONFIG to a file the checker could not read.
    """
    problems = []
    servers = kiln_servers(config)
    coordinators = [n for n, s in servers.items() if compose_kiln_role(s) in KILN_GRPC_ROLES]
    for name, service in servers.items():
        where = f"service {name}"
        file = kiln_configs.get(name, {})
        if file is None:
            problems.append(
                f"{where}: KILN_CONFIG is not a file mounted from this directory, so its "
                "settings cannot be checked"
            )
            file = {}
        farm = dig(file, "coordinator", "farm", default={}) or {}
        url = kiln_setting(service, "--farm-advertise-url", "KILN_FARM_ADVERTISE_URL")
        url = url or farm.get("advertise_url")
        replica = name in coordinators and bool(url or farm.get("enabled"))
        if name in coordinators and not replica and len(coordinators) > 1:
            problems.append(
                f"{where}: one of {len(coordinators)} kiln servers but not a farm replica "
                "(no KILN_FARM_ADVERTISE_URL): each would schedule on its own"
            )
        if replica:
            problems += advertise_url_violations(where, name, service, url)
        if not replica and len(servers) == 1:
            continue
        who = "a farm replica" if replica else f"one of {len(servers)} kiln servers"
        postgres = kiln_setting(service, "--postgres-url", "KILN_POSTGRES_URL")
        if not postgres and dig(file, "metadata", "backend") != "postgres":
            problems.append(
                f"{where}: {who} needs its metadata in PostgreSQL (KILN_POSTGRES_URL "
                'or [metadata] backend = "postgres")'
            )
        backend = kiln_setting(service, "--storage-backend", "KILN_STORAGE_BACKEND")
        if (backend or dig(file, "storage", "backend")) != "s3":
            problems.append(
                f"{where}: {who} needs its blobs in a bucket (KILN_STORAGE_BACKEND=s3 "
                'or [storage] backend = "s3")'
            )
    return problems


def advertise_url_violations(where: str, name: str, service: dict, url: str | None) -> list[str]:
    """A farm replica's advertise URL must reach the replica itself, at its gRPC port."""
    match = re.match(r"^https?://([^/:]+)(?::(\d+))?/?$", url or "")
    if not match:
        return [f"{where}: a farm replica needs an advertise URL (http://HOST:PORT), got {url!r}"]
    problems = []
    host, port = match.group(1), int(match.group(2) or 80)
    own = {name, service.get("hostname"), service.get("container_name")} - {None}
    if host not in own:
        problems.append(
            f"{where}: KILN_FARM_ADVERTISE_URL {url} names {host}, not the service itself: "
            "the other replicas would forward to the wrong one"
        )
    grpc = kiln_ports(service)["gRPC"]
    if port != grpc:
        problems.append(
            f"{where}: KILN_FARM_ADVERTISE_URL {url} has port {port}, not its gRPC port {grpc}"
        )
    return problems


# ---------------------------------------------------------------- HAProxy

# Keywords that open a section of an HAProxy configuration (at the start of a line).
HAPROXY_SECTIONS = {
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "resolvers",
    "peers",
    "userlist",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
}


def parse_haproxy(text: str) -> list[tuple[str, str, list[list[str]]]]:
    """(section keyword, section name, the section's lines as words), comments dropped."""
    sections: list[tuple[str, str, list[list[str]]]] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace() and words[0] in HAPROXY_SECTIONS:
            sections.append((words[0], words[1] if len(words) > 1 else "", []))
        elif sections:
            sections[-1][2].append(words)
    return sections


def balancer_violations(config: dict, balancer: str, text: str) -> list[str]:
    """An HAProxy configuration a compose service runs, against that compose file: each
    backend balances exactly the kiln servers serving its port (gRPC or registry), gRPC
    over HTTP/2, each server health-checked on /readyz at kiln's metrics port."""
    servers = kiln_servers(config)
    where = f"service {balancer}'s HAProxy configuration"
    problems = []
    defaults_params: list[str] = []
    defaults_httpchk: list[str] = []
    balanced: dict[str, bool] = {"gRPC": False, "registry": False}
    for keyword, section, lines in parse_haproxy(text):
        if keyword == "defaults":
            defaults_params = haproxy_words(lines, "default-server")
            defaults_httpchk = haproxy_words(lines, "option", "httpchk")
            continue
        if keyword not in ("backend", "listen"):
            continue
        backend = f"{where}: backend {section}"
        params = defaults_params + haproxy_words(lines, "default-server")
        httpchk = haproxy_words(lines, "option", "httpchk") or defaults_httpchk
        kinds: set[str] = set()
        named: list[str] = []
        for line in (entry for entry in lines if entry[0] == "server" and len(entry) >= 3):
            server, address, own = line[1], line[2], line[3:]
            host, _, port_text = address.rpartition(":")
            if host not in servers:
                problems.append(
                    f"{backend}: server {server} points at {host or address}, which is not a "
                    "kiln server of this compose file"
                )
                continue
            named.append(host)
            ports = kiln_ports(servers[host])
            port = int(port_text) if port_text.isdigit() else None
            kind = next((k for k in ("gRPC", "registry") if ports[k] == port), None)
            if kind is None:
                problems.append(
                    f"{backend}: server {server} points at port {port_text}, which {host} "
                    f"serves nothing on (gRPC {ports['gRPC']}, registry {ports['registry']})"
                )
                continue
            kinds.add(kind)
            words = params + own
            if kind == "gRPC" and haproxy_param(words, "proto") != "h2":
                problems.append(
                    f"{backend}: server {server} gets gRPC over HTTP/1.1; gRPC needs HTTP/2 "
                    "(proto h2)"
                )
            if "check" not in words:
                problems.append(f"{backend}: server {server} is not health-checked (check)")
            check_port = haproxy_param(words, "port") or port_text
            if check_port != str(ports["metrics"]):
                problems.append(
                    f"{backend}: server {server} is health-checked on port {check_port}, not "
                    f"on {host}'s metrics port {ports['metrics']} (/readyz)"
                )
        if len(kinds) > 1:
            problems.append(f"{backend} mixes gRPC and registry servers")
        if not named:
            continue
        if "/readyz" not in httpchk:
            problems.append(f"{backend} does not check /readyz (option httpchk GET /readyz)")
        for kind in kinds:
            balanced[kind] = True
            serving = {n for n, s in servers.items() if kiln_ports(s)[kind] is not None}
            missing = sorted(serving - set(named))
            if missing:
                problems.append(f"{backend} leaves out kiln server(s) {', '.join(missing)}")
        for host in sorted({h for h in named if named.count(h) > 1}):
            problems.append(f"{backend} names {host} more than once")
    for kind, done in balanced.items():
        if not done and any(kiln_ports(s)[kind] is not None for s in servers.values()):
            problems.append(f"{where}: no backend balances the kiln servers' {kind} port")
    return problems


def haproxy_words(lines: list[list[str]], *keyword: str) -> list[str]:
    """The words after `keyword` on every line of a section that starts with it."""
    n = len(keyword)
    return [w for words in lines if tuple(words[:n]) == keyword for w in words[n:]]


def haproxy_param(words: list[str], keyword: str) -> str | None:
    """The value of the last `keyword VALUE` among server parameters (later ones win)."""
    value = None
    for i, word in enumerate(words[:-1]):
        if word == keyword:
            value = words[i + 1]
    return value


# ---------------------------------------------------------------- Dockerfile


def dockerfile_violations(commands: list) -> list[str]:
    """Rules for a Dockerfile parsed by the `dockerfile` package (BuildKit's parser)."""
    problems = []
    args: dict[str, str] = {}
    stages: list[str] = []
    final: list = []
    seen_from = False
    for command in commands:
        if command.cmd == "ARG" and not seen_from:
            for item in command.value:
                key, _, default = item.partition("=")
                args[key] = default
        if command.cmd == "FROM":
            seen_from = True
            image = substitute(command.value[0], args)
            if image.lower() not in stages and image != "scratch":
                problems += [
                    f"line {command.start_line}: FROM {p}" for p in image_violations(image)
                ]
            if len(command.value) >= 3 and command.value[1].upper() == "AS":
                stages.append(command.value[2].lower())
            final = []
        final.append(command)
    if not seen_from:
        return ["no FROM instruction"]
    by_cmd: dict[str, list] = {}
    for command in final:
        by_cmd.setdefault(command.cmd, []).append(command)
    users = by_cmd.get("USER", [])
    if not users:
        problems.append("the final stage has no USER (it would run as root)")
    else:
        uid = users[-1].value[0].split(":", 1)[0]
        if not uid.isdigit() or int(uid) == 0:
            problems.append(
                f"the final stage's USER must be a numeric non-root uid, got {users[-1].value[0]!r}"
            )
    health = by_cmd.get("HEALTHCHECK", [])
    if not health or health[-1].value[0].upper() == "NONE":
        problems.append("the final stage has no HEALTHCHECK")
    entrypoint = by_cmd.get("ENTRYPOINT", [])
    if not entrypoint or not entrypoint[-1].json:
        problems.append("the final stage needs an exec-form (JSON) ENTRYPOINT")
    elif entrypoint[-1].value[0] in ("kiln", "/usr/local/bin/kiln"):
        exposed = {p.split("/")[0] for c in by_cmd.get("EXPOSE", []) for p in c.value}
        for port in ("8980", "5000", "9090"):
            if port not in exposed:
                problems.append(f"kiln's image does not EXPOSE {port}")
    return problems


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text
    )


# ---------------------------------------------------------------- values.yaml docs

KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$")


def undocumented_values(text: str) -> list[str]:
    """Every leaf key of a values file needs a comment on itself or on an ancestor key.

    A leaf is a key with an inline value or a list below it; a key whose block holds
    further keys is a section, documented through its children.
    """
    lines = text.splitlines()
    significant = [
        (number, line)
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.strip().startswith("#")
    ]
    problems = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for position, (number, line) in enumerate(significant):
        match = KEY_LINE.match(line)
        if match is None or line.strip().startswith("-"):
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        previous = lines[number - 2].strip() if number >= 2 else ""
        documented = previous.startswith("#") or any(doc for _, doc in stack)
        following = significant[position + 1][1] if position + 1 < len(significant) else ""
        following_key = KEY_LINE.match(following)
        is_section = (
            match.group(3).split(" #", 1)[0].strip() == ""
            and following_key is not None
            and not following.strip().startswith("-")
            and len(following_key.group(1)) > indent
        )
        if not is_section and not documented:
            problems.append(f"line {number}: value {match.group(2)!r} has no comment")
        stack.append((indent, documented))
    return problems
