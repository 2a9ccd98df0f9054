"""cluster/onprem and cluster/k8s: the launcher config passes Ray's own validation, the KubeRay
manifests pass the project's schema, broken variants are rejected, and every entrypoint,
config path and import path they name exists in the repository."""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "cluster" / "k8s"
RAY_KINDS = ("raycluster", "rayjob", "rayservice")


def manifest(name: str) -> dict:
    return yaml.safe_load((K8S / f"{name}.yaml").read_text())


def schema() -> dict:
    s = json.loads((K8S / "schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(s)
    return s


# -- on-prem launcher ------------------------------------------------------------------------


def test_onprem_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "onprem" / "cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type is not None
    setup = " ".join(prepared["setup_commands"])
    assert "-c constraints.txt" in setup, "hosts must install from the pins"
    assert "mlflow server" in " ".join(prepared["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in prepared["head_start_ray_commands"] if "ray start" in c)


def test_onprem_launcher_config_with_a_misspelt_field_is_rejected():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "onprem" / "cluster.yaml").read_text())
    config["max_workerz"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        validate_config(prepare_config(config))


# -- KubeRay manifests -----------------------------------------------------------------------


@pytest.mark.parametrize("name", RAY_KINDS)
def test_kuberay_manifests_validate(name):
    doc = manifest(name)
    jsonschema.validate(doc, schema())
    assert doc["apiVersion"] == "ray.io/v1"


@pytest.mark.parametrize(
    "name, path, value, message",
    [
        ("rayjob", ["spec", "submissionMode"], "K8sMode", "K8sMode"),
        ("rayjob", ["spec", "shutdownAfterJobFinishes"], "yes", "not of type 'boolean'"),
        ("raycluster", ["spec", "headGroupSpec", "serviceType"], "Ingress", "Ingress"),
        ("raycluster", ["spec", "workerGroupSpecs", 0, "replicaz"], 2, "replicaz"),
        ("rayservice", ["spec", "serveConfig"], "applications: []", "serveConfig"),
        ("rayservice", ["apiVersion"], "ray.io/v1alpha1", "ray.io/v1"),
        ("raycluster", ["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "not of type 'string'"),
    ],
)
def test_a_wrong_field_or_enum_value_is_rejected(name, path, value, message):
    doc = manifest(name)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        jsonschema.validate(doc, schema())


def _module_attr_exists(import_path: str) -> bool:
    module, attr = import_path.split(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(source.read_text())
    return any(isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == attr for n in tree.body)


def test_the_rayjob_entrypoint_and_its_config_exist():
    argv = shlex.split(manifest("rayjob")["spec"]["entrypoint"])
    assert argv[0] == "python"
    assert (ROOT / argv[1]).is_file(), argv[1]
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), config
    from bitlm.config import load_config

    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / config, overrides)  # the overrides name real keys with valid values
    assert cfg.run.storage_path.startswith("/mnt/bitlm")
    assert cfg.data.output_dir.startswith("/mnt/bitlm")


def test_the_rayservice_runs_the_serve_apps_config():
    served = yaml.safe_load(manifest("rayservice")["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    for app_k8s, app_local in zip(served["applications"], local["applications"], strict=True):
        assert _module_attr_exists(app_k8s["import_path"]), app_k8s["import_path"]
        assert app_k8s["import_path"] == app_local["import_path"]
        assert app_k8s["deployments"] == app_local["deployments"]
        assert {k: v for k, v in app_k8s["args"].items() if k != "checkpoint"} == {
            k: v for k, v in app_local["args"].items() if k != "checkpoint"
        }
        assert app_k8s["args"]["checkpoint"].startswith("/mnt/bitlm/")


def test_every_pod_uses_the_image_the_dockerfile_builds_and_mounts_the_shared_volume():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert "-c constraints.txt" in dockerfile
    for line in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / line).exists(), f"Dockerfile copies {line}, which does not exist"
    claims = {d["metadata"]["name"] for d in yaml.safe_load_all((K8S / "storage.yaml").read_text())}
    for name in RAY_KINDS:
        spec = manifest(name)["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            assert {c["image"] for c in pod["containers"]} == {"bitlm:0.1.0"}
            assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} <= claims
            assert all(m["mountPath"] == "/mnt/bitlm" for c in pod["containers"] for m in c["volumeMounts"])
