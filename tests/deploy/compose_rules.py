"""kiln's invariants for compose files and the HAProxy configurations they mount, as
functions over parsed data (split from deploy_rules.py, whose conventions they follow):
each kiln service's settings, several kiln servers forming one farm, and a balancer
that names exactly those servers and checks their readiness.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from deploy_rules import KILN_DATA_DIR, KILN_ROLES_WITH_STORE, dig, image_violations

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
