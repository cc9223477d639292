"""The deploy files agree with Kubernetes, KubeRay, Ray, the Dockerfile and pyproject.toml — offline.

A manifest that fails here would fail at `kubectl apply` (schema), at reconcile time (a Secret key or
Service name that does not exist) or, worst, silently (a misspelt field the API server drops, a Ray node
whose version differs from the head's).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from jobs.spec import load_spec
from tests.deploy import deployfiles as df

DOCS = df.k8s_documents()
CORE_DOCS = [d for d in DOCS if d[1]["kind"] not in df.KUBERAY_KINDS]
KUBERAY_DOCS = [d for d in DOCS if d[1]["kind"] in df.KUBERAY_KINDS]
VERSIONS = df.k8s_versions()


def objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == kind}


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_value(container: dict, name: str, config_maps: dict[str, dict]) -> str:
    """A container's env var, from `env` or from an envFrom ConfigMap."""
    for var in container.get("env", []):
        if var["name"] == name and "value" in var:
            return var["value"]
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref and name in config_maps[ref["name"]]["data"]:
            return config_maps[ref["name"]]["data"][name]
    raise KeyError(f"{container['name']} has no {name}")


# --- schemas ---------------------------------------------------------------------------------------


def test_deploy_folder_has_the_manifests() -> None:
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet", "Secret", "ConfigMap"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", CORE_DOCS, ids=df.doc_id)
def test_core_manifest_validates(item: tuple[str, dict], version: str) -> None:
    df.validate_core(item[1], version)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=df.doc_id)
def test_kuberay_manifest_validates(item: tuple[str, dict], version: str) -> None:
    df.validate_kuberay(item[1], version)


def test_validators_reject_misspelt_and_missing_fields() -> None:
    """The checks above are strict: each of these mistakes must be caught."""
    version = VERSIONS[-1]
    cluster = objects("RayCluster")["vqtrain-ray"]
    job = objects("RayJob")["cifar-tokenizer"]

    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpec"] = bad["spec"].pop("workerGroupSpecs")  # KubeRay field
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        df.validate_kuberay(bad, version)

    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["envfrom"] = []  # core field
    with pytest.raises(jsonschema.ValidationError, match="envfrom"):
        df.validate_kuberay(bad, version)

    bad = copy.deepcopy(cluster)
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        df.validate_kuberay(bad, version)

    bad = copy.deepcopy(job)
    del bad["spec"]["rayClusterSpec"]
    with pytest.raises(jsonschema.ValidationError):
        df.validate_kuberay(bad, version)

    deployment = copy.deepcopy(objects("Deployment")["vqtrain-api"])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        df.validate_core(deployment, version)


def test_worker_replicas_within_bounds() -> None:
    for _, doc in KUBERAY_DOCS:
        for cluster in df.kuberay_cluster_specs(doc):
            for group in cluster.get("workerGroupSpecs", []):
                assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group[
                    "groupName"
                ]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((df.K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    optional = {"secrets.example.yaml", "rayjob-example.yaml"}  # applied by hand, see deploy/README.md
    assert listed == {p.name for p in df.k8s_files()} - optional


# --- references between objects --------------------------------------------------------------------


def test_secret_and_configmap_references_resolve() -> None:
    secrets, config_maps, claims = objects("Secret"), objects("ConfigMap"), objects("PersistentVolumeClaim")
    for item in DOCS:
        doc = item[1]
        claim_templates = {t["metadata"]["name"] for t in doc.get("spec", {}).get("volumeClaimTemplates", [])}
        for template in df.pod_templates(doc):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for vol in volumes.values():
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in config_maps, df.doc_id(item)
                if "persistentVolumeClaim" in vol:
                    assert vol["persistentVolumeClaim"]["claimName"] in claims, df.doc_id(item)
            for c in containers(template):
                for mount in c.get("volumeMounts", []):
                    assert mount["name"] in volumes or mount["name"] in claim_templates, (
                        df.doc_id(item),
                        mount,
                    )
                for source in c.get("envFrom", []):
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in secrets, df.doc_id(item)
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in config_maps, df.doc_id(item)
                for var in c.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets[ref["name"]]["stringData"], (df.doc_id(item), ref)


def test_services_select_pods_and_statefulset_has_headless_service() -> None:
    templates = [t for _, doc in DOCS for t in df.pod_templates(doc)]
    services = objects("Service")
    for name, svc in services.items():
        selected = [
            t
            for t in templates
            if svc["spec"]["selector"].items() <= t.get("metadata", {}).get("labels", {}).items()
        ]
        assert selected, f"Service {name} selects no pods"
        ports = {p.get("name") for t in selected for c in containers(t) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)
    for sts in objects("StatefulSet").values():
        assert services[sts["spec"]["serviceName"]]["spec"].get("clusterIP") == "None"


def test_addresses_point_at_the_deployed_services() -> None:
    config_maps, services = objects("ConfigMap"), objects("Service")
    (cluster,) = objects("RayCluster").values()
    api = objects("Deployment")["vqtrain-api"]["spec"]["template"]["spec"]["containers"][0]
    ray = urlparse(env_value(api, "VQTRAIN_RAY_ADDRESS", config_maps))
    # KubeRay names the head Service <cluster>-head-svc; 8265 is the dashboard / Jobs API port.
    assert (ray.scheme, ray.hostname, ray.port) == ("http", f"{cluster['metadata']['name']}-head-svc", 8265)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8265, "name": "dashboard"} in head["ports"]
    for var in ("VQTRAIN_MLFLOW_URI", "MLFLOW_TRACKING_URI"):
        for container in (api, head):
            url = urlparse(env_value(container, var, config_maps))
            assert url.hostname in services, var
            assert url.port in {p["port"] for p in services[url.hostname]["spec"]["ports"]}, var


def test_ray_nodes_do_not_get_the_jobs_api_address() -> None:
    """A driver on a Ray node must join its own cluster; jobs.run prefers VQTRAIN_RAY_ADDRESS over Ray's."""
    config_maps = objects("ConfigMap")
    for _, doc in KUBERAY_DOCS:
        for template in df.pod_templates(doc):
            for c in containers(template):
                with pytest.raises(KeyError):
                    env_value(c, "VQTRAIN_RAY_ADDRESS", config_maps)
    for name in ("ray-head", "ray-worker"):
        assert "VQTRAIN_RAY_ADDRESS" not in df.compose()["services"][name]["environment"]


def test_rayjob_runs_the_spec_it_mounts() -> None:
    (job,) = objects("RayJob").values()
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "jobs.run"]
    spec_path = Path(entry[3])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if Path(m["mountPath"]) == spec_path.parent)
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    spec = yaml.safe_load(objects("ConfigMap")[volume["configMap"]["name"]]["data"][spec_path.name])
    assert spec["kind"] == "tokenizer" and spec["data"]["train"].startswith("s3://")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert sum(g["replicas"] for g in workers) >= spec["resources"]["workers"]


def test_rayjob_spec_is_a_valid_job_spec() -> None:
    (config_map,) = [
        doc for name, doc in DOCS if name == "rayjob-example.yaml" and doc["kind"] == "ConfigMap"
    ]
    (text,) = config_map["data"].values()
    spec = load_spec(text)
    assert spec.kind == "tokenizer" and spec.checkpoint.storage.startswith("s3://")


def test_scaling_doc_specs_are_valid_and_match_its_budgets() -> None:
    """docs/SCALING.md's ImageNet specs validate, and their steps give the epochs its estimate assumes."""
    blocks = re.findall(r"```yaml\n(.*?)```", (df.REPO / "docs" / "SCALING.md").read_text(), re.S)
    specs = {s.kind: s for s in map(load_spec, blocks)}
    assert specs.keys() == {"tokenizer", "tokenize", "maskgit"}
    imagenet = 1_281_167
    for kind, epochs in (("tokenizer", 40), ("maskgit", 300)):
        seen = specs[kind].optim.steps * specs[kind].optim.batch_size * specs[kind].resources.workers
        assert abs(seen / (epochs * imagenet) - 1) < 0.01, (kind, seen)


def test_secret_templates_hold_placeholders_only() -> None:
    docs = [doc for name, doc in DOCS if name == "secrets.example.yaml"]
    assert docs and all(d["kind"] == "Secret" for d in docs)
    for doc in docs:
        for key, value in doc["stringData"].items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY_ID", key):
                assert "CHANGE-ME" in value, f"{doc['metadata']['name']}.{key} looks like a real secret"
    (tokens,) = [d["stringData"]["VQTRAIN_TOKENS"] for d in docs if "VQTRAIN_TOKENS" in d["stringData"]]
    assert all({"name", "sha256"} <= entry.keys() for entry in json.loads(tokens))
    assert not (df.K8S / "secrets.yaml").exists() or "secrets.yaml" in (df.K8S / ".gitignore").read_text()


# --- Dockerfile, images and version pins -----------------------------------------------------------


def test_dockerfile_stages() -> None:
    _, stages = df.dockerfile()
    names = df.stage_names()
    assert {"wheel", "mlflow", "runtime"} <= names
    assert stages[-1].name == "runtime", "the default target (last stage) must be the runtime image"
    for name in ("runtime", "mlflow"):
        user = df.stage(name).users[-1].split(":")[0]
        assert user.isdigit() and int(user) != 0, f"stage {name} must end as a numeric non-root USER"
    for s in stages:
        for copy_args in s.copies:
            for flag in copy_args:
                if flag.startswith("--from="):
                    assert flag.removeprefix("--from=") in names, flag


def test_dockerfile_copies_exist_in_the_build_context() -> None:
    ignore = [
        line
        for line in (df.REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[0] == "*", ".dockerignore is an allow-list"
    for s in df.dockerfile()[1]:
        for copy_args in s.copies:
            if any(a.startswith("--from=") for a in copy_args):
                continue
            for src in [a for a in copy_args if not a.startswith("--")][:-1]:
                assert (df.REPO / src).exists(), f"COPY {src}: not in the repository"
                assert src.split("/")[0] in allowed, f"COPY {src}: excluded by .dockerignore"


def test_ray_version_matches_pin_everywhere() -> None:
    pin = df.pinned("ray")
    base = df.parse_image(df.stage("runtime").base)
    assert base.repository == "ray" and base.tag is not None
    ray_version, python_tag, _ = base.tag.split("-")
    assert ray_version in SpecifierSet(pin), (ray_version, pin)
    for _, doc in KUBERAY_DOCS:
        for cluster in df.kuberay_cluster_specs(doc):
            assert cluster["rayVersion"] == ray_version
    # Every mention of a Ray image in the deploy docs and the Dockerfile names the same release.
    texts = [df.DOCKERFILE, df.DEPLOY / "README.md", df.REPO / "docs" / "SCALING.md"]
    for path in texts:
        for version in re.findall(r"rayproject/ray:([0-9.]+)", path.read_text()):
            assert version == ray_version, f"{path.name} names rayproject/ray:{version}"
    requires = df.pyproject()["project"]["requires-python"]
    assert python_tag == "py" + re.sub(r"[^0-9]", "", requires), (python_tag, requires)


def test_torch_and_mlflow_build_args_match_pins() -> None:
    assert "==" + df.stage("runtime").args["TORCH_VERSION"] == df.pinned("torch")
    assert "==" + df.stage("mlflow").args["MLFLOW_VERSION"] == df.pinned("mlflow")
    python = df.parse_image(df.stage("mlflow").base)
    minor = re.sub(r"[^0-9.]", "", df.pyproject()["project"]["requires-python"])
    assert python.repository == "python" and python.tag.startswith(minor + "."), python


def check_image(ref: str, built: dict[str, str]) -> None:
    image = df.parse_image(ref)
    version = df.pyproject()["project"]["version"]
    if image.repository in built:
        assert built[image.repository] in df.stage_names()
        tags = {version, f"{version}-cuda"} if built[image.repository] == "runtime" else {version}
        assert image.tag in tags, f"{ref}: images built here are tagged {sorted(tags)}"
    else:
        assert df.is_pinned(image), f"{ref}: pin public images to a version tag or digest"


def test_compose_parses_and_names_existing_targets() -> None:
    services = df.compose()["services"]
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "minio", "api"} <= services.keys()
    built = df.compose_built_images()
    assert built == {"vqtrain": "runtime", "vqtrain-mlflow": "mlflow"}
    for name, svc in services.items():
        if "build" in svc:
            assert (df.DEPLOY / svc["build"]["context"]).resolve() == df.REPO, name
            assert (df.REPO / svc["build"]["dockerfile"]).resolve() == df.DOCKERFILE, name
            assert svc["build"]["target"] in df.stage_names(), name
        check_image(svc["image"], built)
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)


def test_compose_addresses_and_variables() -> None:
    services = df.compose()["services"]
    api = services["api"]["environment"]
    assert urlparse(api["VQTRAIN_RAY_ADDRESS"]).hostname == "ray-head"
    assert "--head" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    for svc in ("ray-head", "ray-worker", "api"):
        env = services[svc]["environment"]
        assert urlparse(env["AWS_ENDPOINT_URL"]).hostname == "minio"
        assert urlparse(env["VQTRAIN_MLFLOW_URI"]).hostname == "mlflow"
    # Variables without a default must be set in deploy/.env: the example file lists each of them.
    required = set(re.findall(r"\$\{(\w+)(?::\?[^}]*)?\}", df.COMPOSE.read_text()))
    example = (df.DEPLOY / "compose.env.example").read_text()
    assert required == {"VQTRAIN_TOKENS"}
    assert all(re.search(rf"^{var}=", example, re.M) for var in required)


def test_cluster_images_are_built_here_or_pinned() -> None:
    built = df.compose_built_images()
    for item in DOCS:
        for template in df.pod_templates(item[1]):
            for c in containers(template):
                check_image(c["image"], built)
    (cluster,) = objects("RayCluster").values()
    ray_images = {
        df.parse_image(c["image"]).repository for t in df.pod_templates(cluster) for c in containers(t)
    }
    assert ray_images == {"vqtrain"}


def test_cluster_launcher_validates_and_uses_the_same_image() -> None:
    config = yaml.safe_load(df.LAUNCHER.read_text())
    jsonschema.validate(config, df.ray_launcher_schema())
    assert config["head_node_type"] in config["available_node_types"]
    built = df.compose_built_images()
    images = [config["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t
    ]
    for ref in images:
        check_image(ref, built)
        assert df.parse_image(ref).repository == "vqtrain"
    bad = copy.deepcopy(config)
    bad["docker"]["imagee"] = bad["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, df.ray_launcher_schema())
