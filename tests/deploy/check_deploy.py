#!/usr/bin/env python3
"""Checks every deployment file under a directory (kiln's deploy/ by default).

- Every *.yaml / *.yml file must parse. Kubernetes objects are validated against the
  Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors),
  custom resources against their CRDs' schemas (crd_validate.mjs), and all against
  kiln's invariants (deploy_rules.py): non-root, probes on long-running containers,
  pinned images (no `latest`, no untagged), resources set.
- Every Helm chart is linted and rendered by Helm itself (helm-python-sdk, which embeds
  Helm v4's Go code) with each `ci/*-values.yaml` of the chart, and what it renders is
  checked like any other manifest. Argo CD Applications are rendered with their own
  values too. Renders listed in --must-fail must be refused with the given message.
- Compose files are resolved and schema-checked by docker-compose (`config`), then
  checked service by service. Several kiln servers in one file must form a farm, and an
  HAProxy configuration a service mounts must balance exactly the file's kiln servers.
- HAProxy configurations (`haproxy.cfg`) must pass `haproxy -c`; TOML files must parse.
- Dockerfiles are parsed with BuildKit's parser (the `dockerfile` package).

Every violation is printed; the exit code is 1 if there was any. A file or kind the
checker has no rule for is a violation too: nothing is skipped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import helm_python
import kubernetes_validate
import yaml

import compose_rules
import deploy_rules as rules

# The chart's kubeVersion floor and the newest schema set kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
NOT_DEPLOYMENT_FILES = {".helmignore", "README.md", "NOTES.txt", "expected-violations.txt"}


class Report:
    """Named cases, each passing or failing with its violations."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def case(self, name: str, problems: list[str]) -> None:
        unique = list(dict.fromkeys(problems))
        if unique:
            self.failed += 1
            print(f"FAIL {name}")
            for problem in unique:
                print(f"  VIOLATION {name}: {problem}")
        else:
            self.passed += 1
            print(f"ok   {name}")


class Checker:
    def __init__(self, root: Path, report: Report, crd_node_modules: Path) -> None:
        self.root = root
        self.report = report
        self.crd_node_modules = crd_node_modules

    def relative(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(REPO_ROOT))
        except ValueError:
            return str(path)

    # ------------------------------------------------------------ discovery

    def run(self) -> None:
        charts = sorted(p.parent for p in self.root.rglob("Chart.yaml"))
        chart_internals = [c / d for c in charts for d in ("templates", "charts")]
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            if any(path.is_relative_to(d) for d in chart_internals):
                continue
            name = path.name
            if name.endswith((".yaml", ".yml")):
                self.check_yaml_file(path, charts)
            elif name == "haproxy.cfg" or name.endswith(".haproxy.cfg"):
                self.check_haproxy_config(path)
            elif name.endswith(".toml"):
                self.check_toml(path)
            elif (
                name == "Dockerfile"
                or name.endswith(".Dockerfile")
                or (name.startswith("Dockerfile.") and not name.endswith(".dockerignore"))
            ):
                self.check_dockerfile(path)
            elif (
                name in NOT_DEPLOYMENT_FILES
                or name.endswith(".dockerignore")
                or name.endswith(".tpl")
            ):
                continue
            else:
                self.report.case(self.relative(path), ["no rule for this kind of file"])
        for chart in charts:
            self.check_chart(chart)

    # ------------------------------------------------------------ YAML files

    def check_yaml_file(self, path: Path, charts: list[Path]) -> None:
        name = self.relative(path)
        try:
            documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            self.report.case(name, [f"does not parse as YAML: {e}"])
            return
        problems: list[str] = []
        for document in documents:
            problems += rules.latest_violations(document)
        if path.parent in charts and path.name == "values.yaml":
            problems += [f"undocumented: {p}" for p in rules.undocumented_values(path.read_text())]
            self.report.case(name, problems)
            return
        if path.parent in charts and path.name == "Chart.yaml":
            problems += chart_metadata_violations(documents[0] if documents else {})
            self.report.case(name, problems)
            return
        if path.parent.name == "ci" and path.parent.parent in charts:
            self.report.case(name, problems)  # a render scenario; rendered with its chart
            return
        if len(documents) == 1 and isinstance(documents[0], dict) and "services" in documents[0]:
            problems += self.compose_problems(path)
            self.report.case(name, problems)
            return
        objects = [
            d for d in documents if isinstance(d, dict) and "apiVersion" in d and "kind" in d
        ]
        if not documents or len(objects) != len(documents):
            problems.append("neither Kubernetes objects, a compose file, nor a chart's values")
        self.report.case(name, problems + self.object_problems(objects, name))

    def compose_problems(self, path: Path) -> list[str]:
        """Resolve the file with docker-compose (schema, anchors, interpolation), then check it."""
        text = path.read_text()
        # Check the file's own defaults: variables it references are unset from the
        # environment, and required ones (${NAME:?message}) get a placeholder.
        referenced = set(re.findall(r"\$\{(\w+)", text))
        env = {k: v for k, v in os.environ.items() if k not in referenced}
        for variable in re.findall(r"\$\{(\w+):?\?", text):
            env[variable] = "placeholder-for-check"
        result = subprocess.run(
            ["docker-compose", "--project-directory", str(path.parent), "-f", str(path), "config"],
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            return [f"docker-compose config rejects it: {result.stderr.strip()}"]
        config = yaml.safe_load(result.stdout)
        problems = compose_rules.compose_violations(config)
        mounted = mounted_files(config)
        kiln_configs: dict[str, dict | None] = {}
        for name, service in compose_rules.kiln_servers(config).items():
            target = compose_rules.compose_environment(service).get("KILN_CONFIG")
            target = compose_rules.kiln_setting(service, "--config", "KILN_CONFIG") or target
            if target:
                source = mounted.get(name, {}).get(target)
                kiln_configs[name] = parse_toml(source) if source else None
        problems += compose_rules.farm_violations(config, kiln_configs)
        for name, files in mounted.items():
            for target, source in files.items():
                if target == HAPROXY_CONFIG or source.name.endswith("haproxy.cfg"):
                    problems += compose_rules.balancer_violations(config, name, source.read_text())
        return problems

    # ------------------------------------------------------------ Kubernetes objects

    def object_problems(self, objects: list[dict], origin: str) -> list[str]:
        problems: list[str] = []
        deployments = {
            rules.dig(o, "metadata", "name") for o in objects if o["kind"] == "Deployment"
        }
        services = [o for o in objects if o["kind"] == "Service"]
        repositories = {
            rules.dig(o, "metadata", "name") for o in objects if o["kind"] == "ImageRepository"
        }
        policies = {
            f"{rules.dig(o, 'metadata', 'namespace', default='default')}:{rules.dig(o, 'metadata', 'name')}"
            for o in objects
            if o["kind"] == "ImagePolicy"
        }
        custom = [obj for obj in objects if not has_kubernetes_schema(obj)]
        crd_results = dict(zip(map(id, custom), self.crd_schema_violations(custom)))
        for obj in objects:
            name = rules.object_name(obj)
            if id(obj) in crd_results:
                if crd_results[id(obj)]:
                    problems.append(f"{name}: {crd_results[id(obj)]}")
                problems += self.custom_problems(
                    obj, deployments, services, repositories, policies, origin
                )
            else:
                problems += [f"{name}: {p}" for p in schema_violations(obj)]
                problems += rules.workload_violations(obj)
                if obj["kind"] == "HorizontalPodAutoscaler":
                    problems += rules.hpa_violations(obj, deployments)
        return problems

    def crd_schema_violations(self, objects: list[dict]) -> list[str | None]:
        """Validate custom resources against their CRD schemas (crd_validate.mjs, node)."""
        if not objects:
            return []
        result = subprocess.run(
            ["node", str(HERE / "crd_validate.mjs"), str(self.crd_node_modules)],
            input=json.dumps(objects),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"error: crd_validate.mjs failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def custom_problems(
        self,
        obj: dict,
        deployments: set[str],
        services: list[dict],
        repositories: set[str],
        policies: set[str],
        origin: str,
    ) -> list[str]:
        kind = obj["kind"]
        name = rules.object_name(obj)
        problems = (
            [] if rules.dig(obj, "metadata", "name") else [f"{kind}: metadata.name is missing"]
        )
        if not isinstance(obj.get("spec"), dict):
            return problems + [f"{name}: spec is missing"]
        if kind == "ScaledObject":
            problems += rules.scaled_object_violations(obj, deployments)
        elif kind == "ServiceMonitor":
            problems += rules.service_monitor_violations(obj, services)
        elif kind == "Application":
            problems += rules.application_values_violations(obj)
            problems += self.render_application(obj, origin)
        elif kind == "ImageRepository":
            problems += rules.image_repository_violations(obj)
        elif kind == "ImagePolicy":
            problems += rules.image_policy_violations(obj, repositories)
        elif kind == "ImageUpdateAutomation":
            problems += self.automation_problems(obj, policies)
        return problems

    def render_application(self, app: dict, origin: str) -> list[str]:
        """Render the chart an Argo CD Application points at, with the Application's values."""
        source = rules.dig(app, "spec", "source", default={})
        chart = REPO_ROOT / str(source.get("path", ""))
        if not source.get("path") or not (chart / "Chart.yaml").is_file():
            return [
                f"{rules.object_name(app)}: source.path {source.get('path')!r} is not a chart in this repository"
            ]
        release = rules.dig(source, "helm", "releaseName") or rules.dig(app, "metadata", "name")
        namespace = rules.dig(app, "spec", "destination", "namespace", default="default")
        values = rules.dig(source, "helm", "valuesObject", default={})
        case = f"{origin} -> {self.relative(chart)} rendered with the Application's values"
        objects, problems = self.render(chart, values, release, namespace)
        problems += self.object_problems(objects, case)
        rendered_names = {(o["kind"], rules.dig(o, "metadata", "name")) for o in objects}
        for ignored in rules.dig(app, "spec", "ignoreDifferences", default=[]) or []:
            if (ignored.get("kind"), ignored.get("name")) not in rendered_names:
                problems.append(
                    f"ignoreDifferences names {ignored.get('kind')}/{ignored.get('name')}, "
                    "which the chart does not render"
                )
        self.report.case(case, problems)
        return []

    def automation_problems(self, obj: dict, policies: set[str]) -> list[str]:
        """The automation's path must exist and carry setter markers for a policy defined here."""
        name = rules.object_name(obj)
        path = REPO_ROOT / str(rules.dig(obj, "spec", "update", "path", default=""))
        if not path.is_dir():
            wanted = rules.dig(obj, "spec", "update", "path")
            return [f"{name}: update.path {wanted!r} is not a directory in this repository"]
        markers = set()
        for file in path.rglob("*.y*ml"):
            markers |= set(
                re.findall(r'"\$imagepolicy":\s*"([\w.-]+:[\w.-]+)(?::\w+)?"', file.read_text())
            )
        if not markers & policies:
            return [
                f"{name}: no file under {self.relative(path)} has a $imagepolicy marker for {sorted(policies)}"
            ]
        return []

    # ------------------------------------------------------------ Helm charts

    def check_chart(self, chart: Path) -> None:
        scenarios = sorted((chart / "ci").glob("*-values.yaml")) or [None]
        for scenario in scenarios:
            values = yaml.safe_load(scenario.read_text()) if scenario else {}
            label = scenario.name if scenario else "default values"
            case = f"{self.relative(chart)} rendered with {label}"
            objects, problems = self.render(chart, values or {}, "kiln", "kiln-check")
            if not objects and not problems:
                problems.append("renders no objects")
            problems += self.object_problems(objects, case)
            self.report.case(case, problems)

    def render(
        self, chart: Path, values: dict, release: str, namespace: str
    ) -> tuple[list[dict], list[str]]:
        problems = []
        report = helm_python.lint(
            str(chart),
            values,
            strict=True,
            namespace=namespace,
            kube_version=f"v{KUBERNETES_VERSIONS[0]}",
        )
        for message in report.get("messages", []):
            if message.get("severity", 0) >= 2:
                problems.append(f"helm lint: {message.get('path')}: {message.get('error')}")
        problems += [f"helm lint: {e}" for e in report.get("errors", [])]
        try:
            with helm_python.Chart.load(str(chart)) as loaded:
                manifests = loaded.render(
                    values=values, name=release, namespace=namespace, is_install=True
                )
        except helm_python.HelmError as e:
            return [], problems + [f"helm render failed: {e}"]
        objects = []
        for template, text in sorted(manifests.items()):
            if template.endswith("NOTES.txt"):
                continue
            try:
                documents = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as e:
                problems.append(f"{template} renders invalid YAML: {e}")
                continue
            for document in documents:
                if not (
                    isinstance(document, dict) and "apiVersion" in document and "kind" in document
                ):
                    problems.append(f"{template} renders something that is not a Kubernetes object")
                else:
                    objects.append(document)
        return objects, problems

    def check_must_fail(self, cases_file: Path) -> None:
        """Renders that must be refused, each with the message an operator would see."""
        for case in yaml.safe_load(cases_file.read_text()):
            chart = REPO_ROOT / case["chart"]
            name = f"{case['chart']} refuses {case['why']}"
            try:
                with helm_python.Chart.load(str(chart)) as loaded:
                    loaded.render(
                        values=case["values"], name="kiln", namespace="kiln-check", is_install=True
                    )
            except helm_python.HelmError as e:
                wanted = case["error"]
                self.report.case(
                    name, [] if wanted in str(e) else [f"failed, but without {wanted!r}: {e}"]
                )
                continue
            self.report.case(name, ["rendered, but must be refused"])

    # ------------------------------------------------------------ HAProxy, TOML

    def check_haproxy_config(self, path: Path) -> None:
        """`haproxy -c`: HAProxy parses the file and resolves its references. Service
        names that resolve only inside a compose network (`init-addr …,none`) warn
        "could not resolve address"; any other warning fails like an error."""
        name = self.relative(path)
        haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if haproxy is None:
            self.report.case(name, ["haproxy is not installed (check.sh installs it)"])
            return
        result = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True)
        output = (result.stdout + result.stderr).replace(str(path), name).strip()
        # "[ALERT]    (1234) : config : message" -> ("ALERT", "message")
        lines = [
            (level, re.sub(r"^\[\w+\]\s+\(\d+\) : (config : )?", "", line))
            for line in output.splitlines()
            for level in re.findall(r"^\[(\w+)\]", line)
        ]
        problems = []
        if result.returncode != 0:
            alerts = [text for level, text in lines if level == "ALERT"]
            problems.append("haproxy -c rejects it: " + (" | ".join(alerts) or output))
        problems += [
            f"haproxy -c warns: {text}"
            for level, text in lines
            if level == "WARNING" and "could not resolve address" not in text
        ]
        self.report.case(name, problems)

    def check_toml(self, path: Path) -> None:
        try:
            tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            self.report.case(self.relative(path), [f"does not parse as TOML: {e}"])
            return
        self.report.case(self.relative(path), [])

    # ------------------------------------------------------------ Dockerfiles

    def check_dockerfile(self, path: Path) -> None:
        try:
            commands = dockerfile.parse_file(str(path))
        except dockerfile.GoParseError as e:
            self.report.case(self.relative(path), [f"does not parse: {e}"])
            return
        self.report.case(self.relative(path), rules.dockerfile_violations(list(commands)))


# Where the HAProxy image reads its configuration.
HAPROXY_CONFIG = "/usr/local/etc/haproxy/haproxy.cfg"


def mounted_files(config: dict) -> dict[str, dict[str, Path]]:
    """Per service, the files it bind-mounts from the host that exist here: target -> source
    (docker-compose config has made the sources absolute)."""
    mounted: dict[str, dict[str, Path]] = {}
    for name, service in (config.get("services") or {}).items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                if volume.get("type") != "bind":
                    continue
                source, target = volume.get("source", ""), volume.get("target", "")
            else:
                source, _, rest = str(volume).partition(":")
                target = rest.split(":")[0]
            if source.startswith("/") and Path(source).is_file():
                mounted.setdefault(name, {})[target] = Path(source)
    return mounted


def parse_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError:
        return {}  # reported as that file's own case


def has_kubernetes_schema(obj: dict) -> bool:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        pass
    return True


def schema_violations(obj: dict) -> list[str]:
    """Strict validation against each Kubernetes version's schema (unknown fields fail)."""
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"Kubernetes {version} has no {obj['apiVersion']} {obj['kind']}")
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.absolute_path) or "(top)"
            problems.append(f"Kubernetes {version} schema: {where}: {e.message}")
    return problems


def chart_metadata_violations(meta: Any) -> list[str]:
    problems = []
    if not isinstance(meta, dict) or meta.get("apiVersion") != "v2":
        return ["Chart.yaml must be apiVersion v2"]
    app_version = str(meta.get("appVersion", ""))
    if not re.fullmatch(r"v?\d+\.\d+\.\d+(-[\w.]+)?", app_version):
        problems.append(
            f"appVersion {app_version!r} is not a semver (the image tag defaults to it)"
        )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=REPO_ROOT / "deploy", help="directory to check"
    )
    parser.add_argument("--must-fail", type=Path, help="YAML list of renders that must be refused")
    parser.add_argument(
        "--crd-node-modules",
        type=Path,
        required=True,
        help="node_modules holding tests/deploy/package.json's CRD schema packages",
    )
    args = parser.parse_args()
    if not (args.crd_node_modules / "@kubernetes-models").is_dir():
        print(f"error: no @kubernetes-models packages in {args.crd_node_modules}", file=sys.stderr)
        return 2
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    helm_python.disable_logging()
    report = Report()
    checker = Checker(args.root, report, args.crd_node_modules)
    checker.run()
    if args.must_fail:
        checker.check_must_fail(args.must_fail)
    print(f"check_deploy: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
