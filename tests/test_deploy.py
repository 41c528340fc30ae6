"""deploy/ checked by the real tools: kubectl's kustomize renders every kustomization, kubernetes-validate
(--strict) checks core kinds, the vendored published schemas custom resources, the compose
specification's schema the compose files, promtool the rules (and unit-tests them), hadolint the
Dockerfiles; then the files are checked against each other (ports, selectors, metric names, settings,
datasource uid, image tags)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError as KubernetesValidationError

from gateway.settings import GatewaySettings
from loadtest.stacks.monitoring import (
    ADAPTER_CONFIG,
    DASHBOARD,
    MONITORING,
    PROMETHEUS_RULE,
    RULES,
    SCRAPE_CONFIG,
    prometheus_rule_manifest,
    rule_groups,
)
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
DOCKER = DEPLOY / "docker"
SERVING = ["overlays/gpu", "overlays/cpu", "overlays/object-storage"]
TRAINING = ["training", "training-pytorchjob"]
KUBERNETES_VERSION = "1.37.0"
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrule_v1.json",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjob_v1.json",
}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


def tool(name: str) -> str:
    """A command installed into the project's virtualenv by `make setup` (or on PATH, for promtool)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is missing: run `make setup`"
    return found


@cache
def rendered(kustomization: str) -> tuple[dict, ...]:
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def objects(kustomization: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in rendered(kustomization) if o["kind"] == kind}


def pod_templates(kustomization: str) -> dict[str, dict]:
    """Every pod template (Deployments, Jobs, PyTorchJob replicas) by owner name."""
    templates = {}
    for obj in rendered(kustomization):
        if obj["kind"] in ("Deployment", "Job"):
            templates[obj["metadata"]["name"]] = obj["spec"]["template"]
        elif obj["kind"] == "PyTorchJob":
            for role, spec in obj["spec"]["pytorchReplicaSpecs"].items():
                templates[f"{obj['metadata']['name']}/{role}"] = spec["template"]
    return templates


def containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def strict(schema):
    """Published CRD schemas let unknown fields through where they list properties; kubernetes-validate
    --strict does not, and neither does this: objects with listed properties take no others."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def custom_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = strict(json.loads((DEPLOY / "schemas" / CUSTOM_SCHEMAS[(api_version, kind)]).read_text()))
    return jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema)


def validate_object(obj: dict) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM_SCHEMAS:
        custom_validator(*key).validate(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# --- every object valid ---------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", SERVING + TRAINING)
def test_every_rendered_object_passes_its_schema(kustomization):
    docs = rendered(kustomization)
    assert len(docs) >= 6
    for obj in docs:
        validate_object(obj)


def test_the_schema_checks_reject_a_misspelt_field():
    """The validation above can fail: one typo in a core kind and in a custom resource is caught."""
    deployment = copy.deepcopy(objects("overlays/gpu", "Deployment")["triton"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(KubernetesValidationError):
        validate_object(deployment)
    monitor = copy.deepcopy(objects("overlays/gpu", "ServiceMonitor")["kdserve-gateway"])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate_object(monitor)
    job = copy.deepcopy(objects("training-pytorchjob", "PyTorchJob")["kdserve-distill"])
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_object(job)


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: `!reset`/`!override` mark how an override file merges."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_scalar(node)
        ),
    )


def settings_from(env: dict[str, str], monkeypatch) -> GatewaySettings:
    """GatewaySettings read from exactly these variables, the way the gateway reads its environment."""
    for name in [n for n in os.environ if n.startswith("KDSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fields = {f"KDSERVE_{f.upper()}" for f in GatewaySettings.model_fields}
    assert set(env) <= fields, f"not gateway settings (ignored if set): {sorted(set(env) - fields)}"
    return GatewaySettings()


def compose_file(name: str) -> dict:
    return yaml.load((COMPOSE / name).read_text(), Loader=_ComposeLoader)


def compose_schema() -> dict:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "compose.cpu.yaml"])
def test_compose_files_match_the_compose_specification(name):
    jsonschema.validate(compose_file(name), compose_schema())
    with pytest.raises(jsonschema.ValidationError):
        broken = compose_file(name)
        broken["services"]["gateway"]["restart_policy"] = "always"
        jsonschema.validate(broken, compose_schema())


def test_cpu_override_drops_nvidia_triton_and_serves_embedded(monkeypatch):
    base, cpu = compose_file("compose.yaml"), compose_file("compose.cpu.yaml")
    assert "!reset" in (COMPOSE / "compose.cpu.yaml").read_text()  # depends_on is replaced, not merged
    assert cpu["services"]["triton"]["profiles"] == ["gpu"]  # not started without --profile gpu
    gateway = {**base["services"]["gateway"], **cpu["services"]["gateway"]}
    gateway["environment"] = {**base["services"]["gateway"]["environment"], **cpu["services"]["gateway"]["environment"]}
    assert gateway["depends_on"] == {}
    assert gateway["environment"]["KDSERVE_EMBEDDED_TRITON"] == "true"
    assert "triton" in gateway["networks"]["default"]["aliases"]  # Prometheus's triton:8002 target
    settings = settings_from(gateway["environment"], monkeypatch)
    assert settings.embedded_triton and settings.triton_url == "0.0.0.0:8000"


def test_promtool_checks_rules_and_scrape_config_and_runs_the_alert_unit_tests():
    promtool = tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(SCRAPE_CONFIG)]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = MONITORING / "prometheus" / "rules_test.yml"
    proc = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(tests.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested, f"alerts without a firing unit test: {sorted(alerts - tested)}"


def test_promtool_rejects_a_broken_rule(tmp_path):
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("histogram_quantile(0.5,", "histogram_quantile(0.5", 1))
    proc = subprocess.run([tool("promtool"), "check", "rules", str(broken)], capture_output=True, text=True)
    assert proc.returncode != 0


def test_prometheus_rule_carries_the_rules_file():
    assert PROMETHEUS_RULE.read_text() == prometheus_rule_manifest(), "run `make deploy-rules`"
    rule = objects("overlays/gpu", "PrometheusRule")["kdserve"]
    assert rule["spec"]["groups"] == rule_groups()


# --- the files agree with each other ----------------------------------------------------------------


def _matches(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("kustomization", SERVING)
def test_selectors_ports_and_targets_line_up(kustomization):
    deployments = objects(kustomization, "Deployment")
    pods = {name: d["spec"]["template"] for name, d in deployments.items()}
    ports = {
        name: {p["name"]: p["containerPort"] for c in containers(t) for p in c.get("ports", [])}
        for name, t in pods.items()
    }

    def selected(selector: dict) -> list[str]:
        return [name for name, t in pods.items() if _matches(selector, t["metadata"]["labels"])]

    for name, deployment in deployments.items():
        assert _matches(deployment["spec"]["selector"]["matchLabels"], pods[name]["metadata"]["labels"])
    services = objects(kustomization, "Service")
    for service in services.values():
        [target] = selected(service["spec"]["selector"])
        for port in service["spec"]["ports"]:
            assert ports[target][port["targetPort"]] == port["port"], (service["metadata"]["name"], port)
    for hpa in objects(kustomization, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    for pdb in objects(kustomization, "PodDisruptionBudget").values():
        assert len(selected(pdb["spec"]["selector"]["matchLabels"])) == 1
    for policy in objects(kustomization, "NetworkPolicy").values():
        targets = selected(policy["spec"]["podSelector"].get("matchLabels", {}))
        assert targets, policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer:
                    assert selected(peer["podSelector"]["matchLabels"])
            for port in rule.get("ports", []):
                assert all(port["port"] in ports[t].values() for t in targets), (policy["metadata"]["name"], port)
    # Triton answers inference to the gateway alone.
    [inference] = [
        r
        for r in objects(kustomization, "NetworkPolicy")["triton"]["spec"]["ingress"]
        if r.get("from", [{}])[0].get("podSelector")
    ]
    assert selected(inference["from"][0]["podSelector"]["matchLabels"]) == ["kdserve-gateway"]

    # Prometheus Operator monitors: what they select exists, under the job names the rules use.
    jobs = {job["job_name"] for job in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    monitored = set()
    for monitor in objects(kustomization, "ServiceMonitor").values():
        [service] = [
            s
            for s in services.values()
            if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
        monitored.add(service["metadata"]["labels"][monitor["spec"]["jobLabel"]])
    for monitor in objects(kustomization, "PodMonitor").values():
        [pod] = selected(monitor["spec"]["selector"]["matchLabels"])
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= set(ports[pod])
        monitored.add(pods[pod]["metadata"]["labels"][monitor["spec"]["jobLabel"]])
    assert monitored == jobs


@pytest.mark.parametrize("kustomization", SERVING)
def test_gateway_and_triton_ports_agree_everywhere(kustomization):
    gateway = objects(kustomization, "Deployment")["kdserve-gateway"]["spec"]["template"]
    triton = objects(kustomization, "Deployment")["triton"]["spec"]["template"]
    [gw] = gateway["spec"]["containers"]
    [tr] = triton["spec"]["containers"]
    env = env_of(gw)
    gateway_port = int(env["KDSERVE_PORT"])
    grpc_port = int(env.get("KDSERVE_GRPC_PORT", GatewaySettings.model_fields["grpc_port"].default))
    assert [p["containerPort"] for p in gw["ports"]] == [gateway_port, grpc_port]
    service = objects(kustomization, "Service")["kdserve-gateway"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service] == [(gateway_port, "http"), (grpc_port, "grpc")]
    policy = objects(kustomization, "NetworkPolicy")["kdserve-gateway"]["spec"]["ingress"]
    assert [p["port"] for p in policy[0]["ports"]] == [gateway_port, grpc_port]
    triton_ports = {p["name"]: p["containerPort"] for p in tr["ports"]}
    args = dict(a.removeprefix("--").split("=", 1) for a in tr["args"])
    assert {name: int(args[f"{name}-port"]) for name in ("http", "grpc", "metrics")} == triton_ports
    assert env["KDSERVE_TRITON_URL"] == f"triton:{triton_ports['http']}"
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"][0]
        for job in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    }
    [rollout] = objects(kustomization, "Deployment")["kdserve-rollout"]["spec"]["template"]["spec"]["containers"]
    rollout_port = int(dict(a.removeprefix("--").split("=", 1) for a in rollout["command"][4:])["port"])
    assert [p["containerPort"] for p in rollout["ports"]] == [rollout_port]
    assert targets == {
        "kdserve-gateway": f"gateway:{gateway_port}",
        "triton": f"triton:{triton_ports['metrics']}",
        "kdserve-rollout": f"rollout:{rollout_port}",
    }
    assert f"--port={rollout_port}" in compose_file("compose.yaml")["services"]["rollout"]["command"]
    compose = compose_file("compose.yaml")["services"]
    assert compose["gateway"]["ports"] == [f"{gateway_port}:{gateway_port}", f"{grpc_port}:{grpc_port}"]
    assert compose["gateway"]["environment"]["KDSERVE_TRITON_URL"] == env["KDSERVE_TRITON_URL"]
    compose_args = dict(a.removeprefix("--").split("=", 1) for a in compose["triton"]["command"][1:])
    assert {name: int(compose_args[f"{name}-port"]) for name in ("http", "grpc", "metrics")} == triton_ports
    dockerfile = (DOCKER / "gateway.Dockerfile").read_text()
    assert f"KDSERVE_PORT={gateway_port}" in dockerfile and f"EXPOSE {gateway_port} {grpc_port}\n" in dockerfile


@pytest.mark.parametrize("kustomization", SERVING + TRAINING)
def test_least_privilege_and_no_secrets(kustomization):
    config_maps = set(objects(kustomization, "ConfigMap"))
    assert not objects(kustomization, "Secret"), "no Secret belongs in a manifest"
    for owner, template in pod_templates(kustomization).items():
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, owner
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0, owner
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", owner
        for container in containers(template):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (owner, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (owner, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (owner, container["name"])
            assert "limits" in container["resources"] and "requests" in container["resources"], owner
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, (owner, source)
            for name in env_of(container):
                assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", name), (owner, name)


@pytest.mark.parametrize("kustomization", SERVING)
def test_triton_probes_shared_memory_and_model_control(kustomization):
    [triton] = objects(kustomization, "Deployment")["triton"]["spec"]["template"]["spec"]["containers"]
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # A slowly loading repository gets minutes before liveness may restart it.
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    volumes = {
        v["name"]: v for v in objects(kustomization, "Deployment")["triton"]["spec"]["template"]["spec"]["volumes"]
    }
    [shm] = [m for m in triton["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert not any("explicit" in a for a in triton["args"]), "the repository API's load/unload stays off"
    gpu = "nvidia.com/gpu" in triton["resources"]["limits"]
    assert gpu == (kustomization != "overlays/cpu")
    assert ("--allow-gpu-metrics=true" in triton["args"]) == gpu


def test_gateway_environment_names_real_settings(monkeypatch):
    """A misspelt KDSERVE_* variable would be silently ignored by the gateway: every one must be a setting,
    and every set of them must validate."""
    gateways = [
        objects(k, "Deployment")["kdserve-gateway"]["spec"]["template"]["spec"]["containers"][0] for k in SERVING
    ]
    sources = [env_of(container) for container in gateways]
    sources += [compose_file(f)["services"]["gateway"]["environment"] for f in ("compose.yaml", "compose.cpu.yaml")]
    sources.append(dict(re.findall(r"(KDSERVE_\w+)=(\S+)", (DOCKER / "gateway.Dockerfile").read_text())))
    for env in sources:
        settings_from({k: v for k, v in env.items() if k.startswith("KDSERVE_")}, monkeypatch)
    assert settings_from(sources[0], monkeypatch).ab_weights == {"student": 0.9, "teacher": 0.1}


DISTILL_OBJECTS = {
    "training": {"Service/kdserve-distill", "Job/kdserve-distill", "NetworkPolicy/kdserve-distill"},
    "training-pytorchjob": {"PyTorchJob/kdserve-distill", "NetworkPolicy/kdserve-distill"},
}


@pytest.mark.parametrize("kustomization", TRAINING)
def test_training_stages_apply_one_at_a_time_by_label(kustomization):
    """deploy/README.md applies the training stages in order with `kubectl apply -k ... -l <selector>`:
    each selector must pick exactly its stage's objects (and the first one the shared PVC and config)."""
    readme = (DEPLOY / "README.md").read_text()
    selectors = re.findall(r"kubectl apply -k deploy/k8s/training -l (\S+(?: \S+)*)", readme)
    assert len(selectors) == 4, selectors

    def picked(selector: str) -> set[str]:
        selector = selector.strip("'")
        names = set()
        for obj in rendered(kustomization):
            value = obj["metadata"].get("labels", {}).get("app.kubernetes.io/name")
            if " notin " in selector:
                excluded = {v.strip() for v in selector.split("(", 1)[1].rstrip(")").split(",")}
                chosen = value not in excluded
            else:
                chosen = value == selector.split("=", 1)[1]
            if chosen:
                names.add(f"{obj['kind']}/{obj['metadata']['name']}")
        return names

    assert [picked(s) for s in selectors] == [
        {"PersistentVolumeClaim/training-data", "ConfigMap/kdserve-training", "Job/kdserve-check-data"},
        DISTILL_OBJECTS[kustomization],
        {"Job/kdserve-export"},
        {"Job/kdserve-redistill"},
    ]
    assert set().union(*map(picked, selectors)) == {
        f"{o['kind']}/{o['metadata']['name']}" for o in rendered(kustomization)
    }


def test_hpa_metrics_are_what_prometheus_adapter_serves():
    served = {rule["name"]["as"] for rule in yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]}
    wanted = {
        metric["pods"]["metric"]["name"]
        for hpa in objects("overlays/gpu", "HorizontalPodAutoscaler").values()
        for metric in hpa["spec"]["metrics"]
        if metric["type"] == "Pods"
    }
    assert wanted == served
    config_map = objects("overlays/gpu", "ConfigMap")["kdserve-prometheus-adapter"]
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == yaml.safe_load(ADAPTER_CONFIG.read_text())


def test_dashboard_names_the_provisioned_datasource_by_uid():
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in text
    dashboard = json.loads(text)
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    compose_ds = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    k8s_ds = yaml.safe_load((MONITORING / "grafana" / "kubernetes-datasource.yml").read_text())
    assert uids == {compose_ds["datasources"][0]["uid"]} == {k8s_ds["datasources"][0]["uid"]}
    assert compose_ds["datasources"][0]["url"] == "http://prometheus:9090"  # the compose service
    config_map = objects("overlays/gpu", "ConfigMap")["kdserve-grafana-dashboard"]
    assert json.loads(config_map["data"]["kdserve.json"]) == dashboard
    provider = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "kdserve.yml").read_text())
    mounts = compose_file("compose.yaml")["services"]["grafana"]["volumes"]
    assert f"../monitoring/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


def test_image_tags_agree():
    images = {c["image"] for k in SERVING + TRAINING for t in pod_templates(k).values() for c in containers(t)}
    ours = {i for i in images if i.startswith("kdserve-")}
    assert ours == {f"kdserve-gateway:{VERSION}", f"kdserve-training:{VERSION}"}
    assert {i for i in images if "tritonserver" in i} == {TRITON_IMAGE}
    compose = compose_file("compose.yaml")["services"]
    assert compose["triton"]["image"] == TRITON_IMAGE and compose["gateway"]["image"] == f"kdserve-gateway:{VERSION}"
    assert f"TRITON_IMAGE:-{TRITON_IMAGE}" in (DEPLOY / "build-engines.sh").read_text()
    for name in ("gateway", "training"):
        assert f"-t kdserve-{name}:{VERSION} ." in (DOCKER / f"{name}.Dockerfile").read_text()


# --- the gateway image ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gateway", "training"])
def test_dockerfiles_pass_hadolint(name, tmp_path):
    dockerfile = DOCKER / f"{name}.Dockerfile"
    proc = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    as_root = tmp_path / "Dockerfile"
    as_root.write_text(dockerfile.read_text() + "USER root\n")
    proc = subprocess.run([tool("hadolint"), "--no-color", str(as_root)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3002" in proc.stdout


def _requirement_closure(root: str, extra: str) -> set[str]:
    """Every distribution `pip install 'root[extra]'` installs, read from the installed metadata."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    pending = [(root, {extra})]
    while pending:
        name, extras = pending.pop()
        seen.add(canonicalize_name(name))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in map(Requirement, requires):
            wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""})
            if wanted and canonicalize_name(req.name) not in seen:
                pending.append((req.name, set(req.extras)))
    return seen


def test_gateway_image_installs_the_serve_extra_only_and_it_has_no_torch():
    dockerfile = (DOCKER / "gateway.Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert len(stages) == 2, "multi-stage: build, then a runtime stage without build tools"
    assert re.findall(r"pip install '\.\[(\w+)\]'", dockerfile) == ["serve"]
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M) and "HEALTHCHECK" in dockerfile
    closure = _requirement_closure("kdserve", "serve")
    assert "fastapi" in closure and "nvidia-pytriton" in closure
    assert not closure & {"torch", "torchvision"}, "the serve extra pulls in torch"
    # ... and the gateway's code imports none: started with torch made unimportable.
    modules = "gateway.app.factory, gateway.cli, gateway.triton.server, kdcontract.manifest"
    probe = f"import sys; sys.modules['torch'] = None; import {modules}"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("kustomization", SERVING)
def test_the_rollout_controller_runs_one_at_a_time_on_the_shared_experiment_with_a_valid_seed(kustomization):
    from gateway.cli import build_parser
    from gateway.experiments.file import read_experiment

    deployments = objects(kustomization, "Deployment")
    rollout = deployments["kdserve-rollout"]
    assert rollout["spec"]["replicas"] == 1 and rollout["spec"]["strategy"]["type"] == "Recreate"
    [container] = rollout["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:4] == ["python", "-m", "gateway", "rollout"]
    args = build_parser().parse_args(command[3:])  # every flag is one the CLI takes
    [gateway] = deployments["kdserve-gateway"]["spec"]["template"]["spec"]["containers"]
    assert env_of(gateway)["KDSERVE_EXPERIMENT_FILE"] == args.experiment_file
    claims = {
        name: {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in d["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        for name, d in deployments.items()
    }
    assert claims["kdserve-rollout"]["experiment"] == claims["kdserve-gateway"]["experiment"] == "kdserve-experiment"
    seed = read_experiment(DEPLOY / "k8s" / "base" / "experiment.json")
    assert seed.rollout.enabled and seed.state.phase == "off"
    compose = compose_file("compose.yaml")["services"]
    compose_args = build_parser().parse_args(compose["rollout"]["command"][3:])
    assert compose_args.experiment_file == compose["gateway"]["environment"]["KDSERVE_EXPERIMENT_FILE"]


def test_the_redistillation_job_reads_the_capture_the_gateways_write_and_exports_into_their_repository():
    import shlex

    from training.cli import build_parser

    [job] = [o for o in rendered("training") if o["metadata"]["name"] == "kdserve-redistill"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    script = container["command"][2].replace('"$RUN_DIR"', "/data/runs/digits")
    argv = shlex.split(script)
    assert argv[:4] == ["exec", "python", "-m", "training"]
    args = build_parser().parse_args(argv[4:])  # every flag is one the CLI takes
    assert args.command == "redistill"

    def claim_at(pod: dict, container: dict, path: str) -> str:
        volume = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[path]
        return {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}[volume]

    assert claim_at(pod, container, args.capture) == "kdserve-capture"
    assert claim_at(pod, container, args.repo) == "model-repository"
    gateway_pod = objects("overlays/cpu", "Deployment")["kdserve-gateway"]["spec"]["template"]["spec"]
    [gateway] = gateway_pod["containers"]
    assert claim_at(gateway_pod, gateway, env_of(gateway)["KDSERVE_CAPTURE_DIR"]) == "kdserve-capture"


@pytest.mark.parametrize("kustomization", SERVING)
def test_the_gateway_reads_its_api_keys_from_a_mounted_secret(kustomization):
    spec = objects(kustomization, "Deployment")["kdserve-gateway"]["spec"]["template"]["spec"]
    [gw] = spec["containers"]
    path = Path(env_of(gw)["KDSERVE_API_KEYS_FILE"])
    [mount] = [m for m in gw["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount.get("readOnly") and "subPath" not in mount  # a subPath mount never sees the Secret change
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mount["name"]]["secret"]["secretName"] == "kdserve-api-keys"
    compose = compose_file("compose.yaml")
    assert compose["services"]["gateway"]["environment"]["KDSERVE_API_KEYS_FILE"] == "/run/secrets/kdserve-api-keys"
    assert compose["services"]["gateway"]["secrets"] == ["kdserve-api-keys"]
    assert "kdserve-api-keys" in compose["secrets"]


MIRROR_SCRIPT = ROOT / "deploy" / "podman" / "debian-mirror.sh"


@pytest.mark.parametrize(
    ("files", "env", "expected"),
    [
        (
            {
                "sources.list.d/debian.sources": "Types: deb\nURIs: http://mirror.example.internal/debian/\n"
                "Suites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\n"
                "URIs: http://mirror.example.internal/debian-security\nSuites: bookworm-security\n",
                "sources.list.d/vendor.sources": "Types: deb\nURIs: https://vendor.example/apt\nSuites: stable\n",
            },
            {},
            "http://mirror.example.internal/debian",
        ),
        (
            {"sources.list": "# a comment\ndeb [arch=amd64 signed-by=/k.gpg] http://proxy:3142/debian bookworm main\n"},
            {},
            "http://proxy:3142/debian",
        ),
        ({}, {}, "http://deb.debian.org/debian"),
        (
            {"sources.list": "deb http://proxy:3142/debian bookworm main\n"},
            {"DEBIAN_MIRROR": "file:///srv/m"},
            "file:///srv/m",
        ),
    ],
    ids=["deb822-local-mirror", "one-line-behind-a-proxy", "nothing-configured", "said-explicitly"],
)
def test_the_image_base_comes_from_the_mirror_apt_uses(tmp_path, files, env, expected):
    """Review finding 22: image.sh hard-coded deb.debian.org for debootstrap; it now follows apt's sources."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    clean = {k: v for k, v in os.environ.items() if k != "DEBIAN_MIRROR"}
    found = subprocess.run(
        ["bash", str(MIRROR_SCRIPT)], env=clean | {"APT_ETC": str(tmp_path)} | env, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == expected
    assert '"$mirror"' in (ROOT / "deploy" / "podman" / "image.sh").read_text()  # and the build uses it
