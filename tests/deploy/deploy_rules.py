"""The invariants kiln's deployment files must keep, as functions over parsed data.

Each rule takes already-parsed input (a Kubernetes object, a resolved compose file, a
parsed Dockerfile, the text of a values file) and returns a list of violation messages.
The driver (check_deploy.py) finds the files, runs the real tools (Helm, docker-compose,
the Kubernetes schemas) and reports. Nothing here reads files or runs processes.
"""

from __future__ import annotations

import re
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
