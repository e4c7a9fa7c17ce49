"""The Helm chart (helm/gptq-gateway) and the Dockerfile, checked offline.

Renders the chart with its defaults and with each value set in tests/helm_values/, then:
helm lint; kubernetes-validate against Kubernetes schemas; checkov with no failed check (each
skip must carry its reason); hadolint on the Dockerfile; every CLI flag the chart passes must
exist in `gptq-gateway <subcommand> --help`; and the chart's own promises (probes, grace period,
sidecar mode, keys, quantize Job, autoscalers, NetworkPolicies) read off the rendered objects.

The tools live in .venv-tools/bin (scripts/install-helm-tools.sh). In CI a missing tool fails the
test; elsewhere it is skipped with the command that installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "gptq-gateway"
VALUE_SETS = {path.stem: path for path in sorted((REPO / "tests" / "helm_values").glob("*.yaml"))}
RENDER_CASES = ["default", *VALUE_SETS]
TOOLS_BIN = Path(os.environ.get("GPTQGW_HELM_TOOLS_BIN", REPO / ".venv-tools" / "bin"))
RELEASE = "demo"
# Rendered for the newest Kubernetes that kubernetes-validate ships schemas for; validated against
# that one and the oldest the chart supports (Chart.yaml kubeVersion).
KUBE_NEWEST = "1.37.0"
KUBE_OLDEST = "1.30.0"
APP_SUBCOMMANDS = ("serve", "openai", "quantize")

Manifest = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Tools and rendering


def tool(name: str) -> str:
    """Path of a chart tool; fails in CI (env CI set) and skips elsewhere when it is missing."""
    candidate = TOOLS_BIN / name
    found = str(candidate) if os.access(candidate, os.X_OK) else shutil.which(name)
    if found:
        return found
    message = f"{name} is not in {TOOLS_BIN} nor on PATH: run bash scripts/install-helm-tools.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def namespace_of(case: str) -> str:
    # One namespace per case, so that checkov's cross-resource checks never pair a pod of one
    # case with a NetworkPolicy of another.
    return f"llm-{case}"


def helm_template(
    case: str = "default", extra: list[str] | None = None, chart: Path = CHART
) -> subprocess.CompletedProcess[str]:
    args = [tool("helm"), "template", RELEASE, str(chart), "--namespace", namespace_of(case)]
    args += ["--kube-version", KUBE_NEWEST]
    if case != "default":
        args += ["--values", str(VALUE_SETS[case])]
    return run(args + (extra or []), timeout=60)


def render(case: str = "default", extra: list[str] | None = None) -> list[Manifest]:
    result = helm_template(case, extra)
    assert result.returncode == 0, f"helm template ({case}) failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(extra: list[str]) -> str:
    result = helm_template("default", extra)
    assert result.returncode != 0, "helm template accepted values it should refuse"
    return result.stderr


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {case: render(case) for case in RENDER_CASES}


@pytest.fixture(scope="module")
def rendered_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each case's manifests as one file, as `helm template` prints them."""
    out = tmp_path_factory.mktemp("rendered")
    for case in RENDER_CASES:
        result = helm_template(case)
        assert result.returncode == 0, f"helm template ({case}) failed:\n{result.stderr}"
        (out / f"{case}.yaml").write_text(result.stdout)
    return out


def find(manifests: list[Manifest], kind: str, name_suffix: str = "") -> list[Manifest]:
    return [
        m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)
    ]


def one(manifests: list[Manifest], kind: str, name_suffix: str) -> Manifest:
    matches = find(manifests, kind, name_suffix)
    assert len(matches) == 1, f"expected one {kind} *{name_suffix}, got {len(matches)}"
    return matches[0]


def pod_templates(manifests: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(workload, pod template) of every Deployment and Job."""
    for m in manifests:
        if m["kind"] in ("Deployment", "Job"):
            yield m, m["spec"]["template"]


def containers(pod_spec: Manifest) -> list[Manifest]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def container(workload: Manifest, name: str) -> Manifest:
    pod_spec = workload["spec"]["template"]["spec"]
    matches = [c for c in containers(pod_spec) if c["name"] == name]
    assert len(matches) == 1, f"{workload['metadata']['name']} has no container {name!r}"
    return matches[0]


def flag_value(args: list[str], flag: str) -> str | None:
    for arg in args:
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# ---------------------------------------------------------------------------------------------
# The validators: helm lint, kubernetes-validate, checkov, hadolint


@pytest.mark.parametrize("case", RENDER_CASES)
def test_helm_lint_passes_strict(case: str) -> None:
    args = [tool("helm"), "lint", str(CHART), "--strict", "--kube-version", KUBE_NEWEST]
    if case != "default":
        args += ["--values", str(VALUE_SETS[case])]
    result = run(args, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kube_version", [KUBE_OLDEST, KUBE_NEWEST])
def test_manifests_match_kubernetes_schemas(rendered_dir: Path, kube_version: str) -> None:
    files = sorted(str(path) for path in rendered_dir.glob("*.yaml"))
    result = run([tool("kubernetes-validate"), "--strict", "-k", kube_version, *files])
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if line.startswith("ERROR")]
    assert result.returncode == 0 and not problems, output
    # The only kinds without a schema are the Prometheus Operator's CRDs (checked further down).
    unknown = set(re.findall(r"Couldn't find schema for kind (\S+)", output))
    assert unknown <= {"ServiceMonitor"}, output
    validated = re.findall(r"passed for resource (\S+)", output)
    assert any(name.startswith("deployment/") for name in validated), output


@pytest.mark.slow
def test_checkov_finds_no_failed_check(rendered_dir: Path) -> None:
    (rendered_dir / "Dockerfile").write_text((REPO / "Dockerfile").read_text())
    args = [tool("checkov"), "--directory", str(rendered_dir), "--output", "json"]
    # --skip-download: offline, and no policies or suppressions fetched from a platform.
    args += ["--framework", "kubernetes", "dockerfile", "--skip-download"]
    result = run(args, timeout=600)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_framework = {report["check_type"]: report for report in reports}
    assert set(by_framework) == {"kubernetes", "dockerfile"}, result.stdout[:2000]
    for framework, report in by_framework.items():
        summary = report["summary"]
        failed = [
            f"{c['check_id']} {c['check_name']}: {c['file_path']} {c['resource']}"
            for c in report["results"]["failed_checks"]
        ]
        assert not failed, f"checkov {framework} failed checks:\n" + "\n".join(failed)
        assert summary["parsing_errors"] == 0, summary
        assert summary["passed"] > 0, summary
        # A skip is acceptable only with its reason written in the chart or the Dockerfile.
        unjustified = [
            f"{c['check_id']} {c['resource']}"
            for c in report["results"]["skipped_checks"]
            if len((c["check_result"].get("suppress_comment") or "").strip()) < 20
        ]
        assert not unjustified, "skips without a reason: " + ", ".join(unjustified)
    # Every case renders at least six objects; fewer means checkov skipped files.
    scanned = by_framework["kubernetes"]["summary"]["resource_count"]
    assert scanned >= 6 * len(RENDER_CASES), by_framework["kubernetes"]["summary"]


def test_dockerfile_passes_hadolint() -> None:
    result = run(
        [tool("hadolint"), "--failure-threshold", "style", str(REPO / "Dockerfile")], timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The chart's command lines against the application's


def app_command_lines(manifests: list[Manifest]) -> Iterator[tuple[str, list[str]]]:
    """(subcommand, flags) of every container that runs the image's gptq-gateway entry point."""
    for _, template in pod_templates(manifests):
        for c in containers(template["spec"]):
            args = c.get("args") or []
            if "command" not in c and args and args[0] in APP_SUBCOMMANDS:
                yield args[0], [arg.split("=", 1)[0] for arg in args[1:] if arg.startswith("--")]


def help_options(subcommand: str) -> set[str] | str:
    """The options `gptq-gateway SUBCOMMAND --help` lists, or why it failed."""
    result = run([sys.executable, "-m", "gateway.cli", subcommand, "--help"], timeout=120)
    if result.returncode != 0:
        return f"`gptq-gateway {subcommand} --help` failed: {result.stderr.strip()[-300:]}"
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", result.stdout))


def test_every_flag_the_chart_passes_exists_in_the_cli(rendered: dict[str, list[Manifest]]) -> None:
    used: dict[str, set[str]] = {}
    for manifests in rendered.values():
        for subcommand, flags in app_command_lines(manifests):
            used.setdefault(subcommand, set()).update(flags)
    # The value sets between them run all three subcommands.
    assert set(used) == set(APP_SUBCOMMANDS), used
    problems = []
    for subcommand, flags in sorted(used.items()):
        options = help_options(subcommand)
        if isinstance(options, str):
            problems.append(options)
        elif flags - options:
            problems.append(f"{subcommand} lacks {sorted(flags - options)}")
    assert not problems, "flags the chart passes that the CLI lacks:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# What the chart promises, read off the rendered objects


@pytest.mark.parametrize("case", RENDER_CASES)
def test_every_pod_is_non_root_read_only_and_capability_free(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    for workload, template in pod_templates(rendered[case]):
        pod = template["spec"]
        where = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        for c in containers(pod):
            context = c["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert context["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), (where, c["name"])
            # Whatever the app writes must land on a writable volume.
            if c["name"] != "wait-for-model":
                mounts = {mount["mountPath"] for mount in c["volumeMounts"]}
                assert {"/tmp", "/home/gptqgw"} <= mounts, (where, c["name"])


@pytest.mark.parametrize("case", RENDER_CASES)
def test_engine_probes_use_grpc_health_on_the_grpc_port(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    engine = container(one(rendered[case], "Deployment", "-engine"), "engine")
    grpc_port = next(p["containerPort"] for p in engine["ports"] if p["name"] == "grpc")
    assert flag_value(engine["args"], "--grpc-port") == str(grpc_port)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert engine[probe]["grpc"]["port"] == grpc_port, probe
    assert engine["readinessProbe"]["grpc"]["service"] == "gptqgw.v1.Gateway"
    startup = engine["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "too short to load"


@pytest.mark.parametrize("case", RENDER_CASES)
def test_grace_period_outlasts_the_prestop_wait_and_the_drain(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    deployment = one(rendered[case], "Deployment", "-engine")
    engine = container(deployment, "engine")
    drain = int(flag_value(engine["args"], "--drain-timeout") or "nan")
    pre_stop = engine["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert (
        deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + pre_stop
    )


def test_a_grace_period_shorter_than_the_drain_is_refused() -> None:
    stderr = render_error(
        [
            "--set",
            "engine.drainTimeoutSeconds=60",
            "--set",
            "engine.terminationGracePeriodSeconds=60",
        ]
    )
    assert "engine.terminationGracePeriodSeconds" in stderr


def test_sidecar_mode_puts_the_shim_in_the_engine_pod(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["sidecar"]
    assert not find(manifests, "Deployment", "-shim")
    engine_deployment = one(manifests, "Deployment", "-engine")
    shim = container(engine_deployment, "shim")
    assert shim["restartPolicy"] == "Always", "the shim should be a native sidecar"
    engine = container(engine_deployment, "engine")
    assert flag_value(shim["args"], "--upstream") == "127.0.0.1:" + flag_value(
        engine["args"], "--grpc-port"
    )
    http = one(manifests, "Service", "-http")
    pod_labels = engine_deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(http["spec"]["selector"], pod_labels)


def test_deployment_mode_points_the_shim_at_the_engine_service(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["default"]
    shim = container(one(manifests, "Deployment", "-shim"), "shim")
    engine_service = one(manifests, "Service", "-engine")
    grpc_port = next(p["port"] for p in engine_service["spec"]["ports"] if p["name"] == "grpc")
    assert flag_value(shim["args"], "--upstream") == (
        f"{engine_service['metadata']['name']}:{grpc_port}"
    )


@pytest.mark.parametrize("case", RENDER_CASES)
def test_services_reach_named_ports_of_the_pods_they_select(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    manifests = rendered[case]
    deployments = find(manifests, "Deployment")
    for service in find(manifests, "Service"):
        targets = [
            d
            for d in deployments
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert targets, f"{service['metadata']['name']} selects no pods"
        for target in targets:
            pod_ports = {
                p["name"]
                for c in containers(target["spec"]["template"]["spec"])
                for p in c.get("ports", [])
            }
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in pod_ports, (service["metadata"]["name"], port)


def test_shim_disabled_leaves_only_the_grpc_api(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["shim-disabled"]
    assert not find(manifests, "Service", "-http")
    assert not find(manifests, "Deployment", "-shim")
    engine = container(one(manifests, "Deployment", "-engine"), "engine")
    assert flag_value(engine["args"], "--metrics-port") == "0"
    assert [p["name"] for p in engine["ports"]] == ["grpc"]


def test_chart_made_secret_gives_the_engine_the_shims_key(
    rendered: dict[str, list[Manifest]],
) -> None:
    values = yaml.safe_load(VALUE_SETS["sidecar"].read_text())["auth"]
    secret = one(rendered["sidecar"], "Secret", "-api-keys")["stringData"]
    assert secret["api-keys"].split() == [*values["keys"], values["upstreamKey"]]
    assert secret["upstream-api-key"] == values["upstreamKey"]


def test_existing_secret_and_claim_are_used_as_given(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["existing-secret"]
    assert not find(manifests, "Secret")
    assert not find(manifests, "PersistentVolumeClaim")
    for workload in find(manifests, "Deployment"):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["api-keys"]["secret"]["secretName"] == "gptq-gateway-keys"
    engine_deployment = one(manifests, "Deployment", "-engine")
    volumes = {v["name"]: v for v in engine_deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "shared-models"
    engine = container(engine_deployment, "engine")
    assert engine["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    assert flag_value(engine["args"], "--api-keys-file") == "/etc/gptq-gateway/keys/api-keys"
    shim = container(one(manifests, "Deployment", "-shim"), "shim")
    assert flag_value(shim["args"], "--upstream-api-key-file") == (
        "/etc/gptq-gateway/keys/upstream-api-key"
    )


def test_quantize_job_writes_the_checkpoint_the_engine_serves(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["quantize-job"]
    job = one(manifests, "Job", "")
    quantize = container(job, "quantize")
    engine_deployment = one(manifests, "Deployment", "-engine")
    engine = container(engine_deployment, "engine")
    assert quantize["args"][:2] == ["quantize", "meta-llama/Llama-3.1-8B-Instruct"]
    assert flag_value(quantize["args"], "--out") == engine["args"][1]
    wait = container(engine_deployment, "wait-for-model")
    assert {"name": "CHECKPOINT", "value": engine["args"][1]} in wait["env"]
    job_claim = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}["models"]
    assert "readOnly" not in job_claim["persistentVolumeClaim"]
    # The Job's name follows its settings: an upgrade with new ones starts a new Job instead of
    # failing on the immutable pod template; an upgrade without changes keeps the finished one.
    same = one(render("quantize-job"), "Job", "")["metadata"]["name"]
    changed = one(render("quantize-job", ["--set", "quantize.bits=8"]), "Job", "")
    assert same == job["metadata"]["name"] != changed["metadata"]["name"]


def test_autoscalers_own_the_replica_counts(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["hpa"]
    for component in ("engine", "shim"):
        deployment = one(manifests, "Deployment", f"-{component}")
        assert "replicas" not in deployment["spec"], component
        hpa = one(manifests, "HorizontalPodAutoscaler", f"-{component}")
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    engine_metrics = one(manifests, "HorizontalPodAutoscaler", "-engine")["spec"]["metrics"]
    assert engine_metrics[0]["type"] == "Pods"
    shim_metrics = one(manifests, "HorizontalPodAutoscaler", "-shim")["spec"]["metrics"]
    assert shim_metrics[0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize("case", RENDER_CASES)
def test_disruption_budgets_and_network_policies_select_real_pods(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    manifests = rendered[case]
    pods = [template["metadata"]["labels"] for _, template in pod_templates(manifests)]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for policy in find(manifests, kind):
            spec = policy["spec"]
            selector = (spec.get("selector") or spec["podSelector"])["matchLabels"]
            assert any(selects(selector, labels) for labels in pods), policy["metadata"]["name"]
    policies = find(manifests, "NetworkPolicy")
    if policies:  # on by default: then every pod is covered by one
        for labels in pods:
            assert any(selects(p["spec"]["podSelector"]["matchLabels"], labels) for p in policies)


def test_network_policy_lets_the_shim_reach_the_engine_and_nothing_else(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["quantize-job"]
    engine_policy = one(manifests, "NetworkPolicy", "-engine")["spec"]
    assert engine_policy["egress"] == []
    grpc_rule = next(r for r in engine_policy["ingress"] if r["ports"][0]["port"] == "grpc")
    shim_labels = one(manifests, "Deployment", "-shim")["spec"]["template"]["metadata"]["labels"]
    assert any(
        selects(peer["podSelector"]["matchLabels"], shim_labels) for peer in grpc_rule["from"]
    )
    shim_egress = one(manifests, "NetworkPolicy", "-shim")["spec"]["egress"]
    ports = sorted((p["port"], p["protocol"]) for rule in shim_egress for p in rule["ports"])
    assert ports == [(53, "TCP"), (53, "UDP"), (50051, "TCP")]


def test_service_monitors_scrape_ports_their_services_have(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["sidecar"]
    monitors = find(manifests, "ServiceMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        services = [
            s
            for s in find(manifests, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, monitor["metadata"]["name"]
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names, monitor["metadata"]["name"]


def test_a_config_change_rolls_the_pods(rendered: dict[str, list[Manifest]]) -> None:
    def checksum(manifests: list[Manifest]) -> str:
        annotations = one(manifests, "Deployment", "-engine")["spec"]["template"]["metadata"]
        return annotations["annotations"]["checksum/config"]

    changed = render("default", ["--set", "config.env.GPTQGW_EXTRA=1"])
    assert one(changed, "ConfigMap", "-config")["data"]["GPTQGW_EXTRA"] == "1"
    assert checksum(changed) != checksum(rendered["default"])


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (["--set", "shim.mode=ambassador"], "'/shim/mode'"),
        (["--set", "engine.replicas=2"], "'replicas' not allowed"),
        (["--set", "engine.device=tpu"], "'/engine/device'"),
        (["--set", "image.digest=latest"], "'/image/digest'"),
        (["--set", "engine.gpu.count=-1"], "'/engine/gpu/count'"),
        (["--set", "auth.enabled=true"], "auth.keys is empty"),
        (["--set", "auth.enabled=true", "--set", "auth.keys={a b}"], "'/auth/keys/0'"),
        (["--set", "quantize.enabled=true"], "quantize.model is empty"),
        (["--set", "shim.mode=sidecar", "--set", "shim.upstream=x:1"], "shim.upstream cannot"),
        (
            ["--set", "shim.mode=sidecar", "--set", "shim.autoscaling.enabled=true"],
            "needs shim.mode",
        ),
    ],
)
def test_bad_values_are_refused_with_the_field_named(values: list[str], named: str) -> None:
    assert named in render_error(values)


def test_notes_show_how_to_reach_both_apis(tmp_path: Path) -> None:
    # `helm template` does not print NOTES.txt: render it through a ConfigMap in a chart copy.
    chart = tmp_path / "gptq-gateway"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include (print $.Template.BasePath "/NOTES.txt") . | quote }}\n'
    )
    result = helm_template("sidecar", ["--show-only", "templates/zz-notes.yaml"], chart=chart)
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    namespace = namespace_of("sidecar")
    for service, port in (
        (f"{RELEASE}-gptq-gateway-engine", 50051),
        (f"{RELEASE}-gptq-gateway-http", 8000),
    ):
        assert f"kubectl -n {namespace} port-forward service/{service} {port}:{port}" in notes


def values_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of values.yaml, stopping at free-form maps and lists (documented whole)."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not _free_form(path):
            yield from values_paths(value, path + ".")
        else:
            yield path


def _free_form(path: str) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    return leaf.endswith(("SecurityContext", "Probe", "resources", "strategy", "behavior", "env"))


def test_chart_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    undocumented = [path for path in values_paths(values) if f"| `{path}` |" not in readme]
    assert not undocumented, f"add rows for these values to {CHART / 'README.md'}: {undocumented}"
