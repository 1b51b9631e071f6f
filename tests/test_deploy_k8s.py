"""deploy/kubernetes: every manifest validates against the Kubernetes OpenAPI schemas shipped
in kubernetes-validate (offline), the ServiceMonitor against the structure Prometheus Operator
expects, and the pieces reference each other consistently."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sensor.cli import build_parser
from sensor.config import Settings, load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                          reason="pip install kubernetes-validate (schemas ship in the package)")
jsonschema = pytest.importorskip("jsonschema")

# The part of monitoring.coreos.com/v1 ServiceMonitor this repository uses, from the CRD.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                                           "targetLabel": {"type": "string"},
                                           "action": {"type": "string"}, "regex": {"type": "string"},
                                           "replacement": {"type": "string"}}}},
                    }}},
            },
        },
    },
}


def documents() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def by_kind(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name)
    return found[0]


@pytest.fixture(scope="module")
def daemonset():
    return by_kind("DaemonSet")


@pytest.mark.parametrize("path,doc", [pytest.param(p, d, id=f"{p.name}:{d['kind']}") for p, d in documents()
                                      if d["apiVersion"] != "monitoring.coreos.com/v1"])
def test_manifest_validates_against_kubernetes_schema(path, doc):
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_validator_rejects_a_broken_daemonset(daemonset):
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_command_line_validator_passes_on_the_directory():
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet",
                           *[str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "servicemonitor.yaml"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_service_monitor_structure_and_selectors():
    monitor = by_kind("ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    service = by_kind("Service")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_service_monitor_schema_rejects_a_typo():
    broken = copy.deepcopy(by_kind("ServiceMonitor"))
    broken["spec"]["endpoint"] = broken["spec"].pop("endpoints")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)


def test_daemonset_host_network_placement_and_least_privilege(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (selector_key, selector_value), = pod["nodeSelector"].items()
    assert any(t["key"] == selector_key and t.get("value") == selector_value for t in pod["tolerations"])
    sensor, = pod["containers"]
    ctx = sensor["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW", "NET_ADMIN"]}
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True
    for init in pod.get("initContainers", []):
        assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert init["securityContext"]["allowPrivilegeEscalation"] is False
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert by_kind("Service")["spec"]["selector"].items() <= pod_labels.items()


def test_daemonset_volumes_reference_existing_configmaps(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = pod["containers"][0]["volumeMounts"]
    for mount in mounts:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            config_map = by_kind("ConfigMap", volume["configMap"]["name"])
            assert config_map["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
            if "subPath" in mount:
                assert mount["subPath"] in config_map["data"]
    state = volumes["state"]
    assert "hostPath" in state or "emptyDir" in state


def test_daemonset_args_and_config_are_accepted_by_the_sensor(daemonset, tmp_path):
    sensor = daemonset["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "192.0.2.10") for e in sensor["env"]}
    argv = [a.replace("$(SENSOR_INTERFACE)", env["SENSOR_INTERFACE"]).replace("$(NODE_IP)", env["NODE_IP"])
            for a in sensor["args"]]
    args = build_parser().parse_args(argv)
    assert args.command == "run" and args.metrics == "192.0.2.10:9917"
    port = next(p["containerPort"] for p in sensor["ports"] if p["name"] == "metrics")
    assert args.metrics.endswith(f":{port}")
    mount = next(m for m in sensor["volumeMounts"] if m.get("subPath"))
    assert args.config == mount["mountPath"]
    config = tmp_path / "purge-sensor.toml"
    config.write_text(by_kind("ConfigMap", "purge-sensor-config")["data"][mount["subPath"]])
    settings = Settings(**load_config(str(config)))
    signatures_mount = next(m["mountPath"] for m in sensor["volumeMounts"] if m["name"] == "signatures")
    assert settings.signatures == [signatures_mount]
    assert env["STATE_DIRECTORY"] == next(m["mountPath"] for m in sensor["volumeMounts"] if m["name"] == "state")


def test_signatures_configmap_matches_the_repository_set(tmp_path):
    generator = K8S / "signatures-configmap.py"
    rendered = subprocess.run([sys.executable, str(generator)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == (K8S / "signatures-configmap.yaml").read_text(), \
        f"regenerate: python3 {generator.relative_to(ROOT)} > deploy/kubernetes/signatures-configmap.yaml"
    data = by_kind("ConfigMap", "purge-sensor-signatures")["data"]
    repo = {p.name: p.read_text() for p in sorted((ROOT / "signatures").glob("*.yaml"))}
    assert data == repo
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    proc = subprocess.run([sys.executable, "-m", "sensor.cli", "signatures", "check", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
