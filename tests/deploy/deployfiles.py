"""Readers for the deploy files (Dockerfile, compose, Kubernetes manifests) and offline validators.

Everything here works without network: the Kubernetes schemas come from the kubernetes-validate package,
the KubeRay schema is vendored beside this file, and Ray's cluster-launcher schema ships with Ray.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
LAUNCHER = DEPLOY / "cluster-launcher.yaml"
KUBERAY_SCHEMA = Path(__file__).with_name("kuberay_v1_schema.yaml")
K8S_DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"
KUBERAY_KINDS = ("RayCluster", "RayJob")


# --- pyproject -------------------------------------------------------------------------------------


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    """The version specifier pyproject.toml gives `package` (in dependencies or any extra), e.g. '==2.60.*'."""
    project = pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    for req in reqs:
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?\s*(==\s*[^;,\s]+)", req.strip())
        if m:
            return m.group(2).replace(" ", "")
    raise LookupError(f"pyproject.toml pins no {package}==…")


# --- Dockerfile ------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str | None
    base: str  # FROM argument with build-arg defaults substituted
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults declared in the stage
    users: list[str] = field(default_factory=list)  # USER instructions, in order
    copies: list[list[str]] = field(default_factory=list)  # COPY arguments (flags included)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def _arg_default(spec: str) -> tuple[str, str | None]:
    name, eq, default = spec.partition("=")
    return name.strip(), (default.strip().strip('"') if eq else None)


@functools.cache
def dockerfile() -> tuple[dict[str, str], tuple[Stage, ...]]:
    """Global ARG defaults and the stages of the repository's Dockerfile."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instr, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if instr == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=_substitute(parts[0], global_args)))
        elif instr == "ARG":
            key, default = _arg_default(rest)
            if not stages:
                if default is not None:
                    global_args[key] = default
            elif default is not None:
                stages[-1].args[key] = default
        elif instr == "USER" and stages:
            stages[-1].users.append(rest)
        elif instr == "COPY" and stages:
            stages[-1].copies.append(rest.split())
    return global_args, tuple(stages)


def stage_names() -> set[str]:
    return {s.name for s in dockerfile()[1] if s.name}


def stage(name: str) -> Stage:
    for s in dockerfile()[1]:
        if s.name == name:
            return s
    raise LookupError(f"Dockerfile has no stage {name!r}")


# --- images ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    ref: str
    repository: str  # last path component, e.g. 'vqtrain' for registry.example.com/vqtrain:0.1.0
    tag: str | None
    digest: str | None


def parse_image(ref: str) -> ImageRef:
    rest, _, digest = ref.partition("@")
    last = rest.rsplit("/", 1)[-1]
    name, _, tag = last.partition(":")
    return ImageRef(ref, name, tag or None, digest or None)


def is_pinned(image: ImageRef) -> bool:
    """A public image is pinned when it names a digest or a versioned tag (not `latest`, has a digit)."""
    if image.digest:
        return True
    return bool(image.tag) and image.tag != "latest" and any(c.isdigit() for c in image.tag)


# --- compose ---------------------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_built_images() -> dict[str, str]:
    """Repository name -> Dockerfile target, for every compose service that builds its image here."""
    built: dict[str, str] = {}
    for svc in compose()["services"].values():
        if "build" in svc:
            built[parse_image(svc["image"]).repository] = svc["build"]["target"]
    return built


# --- Kubernetes ------------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object in deploy/k8s, kustomization excluded."""
    docs = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def doc_id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def k8s_versions() -> tuple[str, ...]:
    """Kubernetes versions to validate against: an older supported minor and the newest shipped."""
    return ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))


def validate_core(doc: dict[str, Any], version: str) -> None:
    """Validate a core Kubernetes object strictly (unknown fields are errors)."""
    kubernetes_validate.validate(doc, version, strict=True)


@functools.cache
def _kuberay_validators(version: str) -> dict[str, jsonschema.protocols.Validator]:
    """One validator per KubeRay kind, its core types resolved against Kubernetes `version` (strict)."""
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((schemas / f"v{version}.0-local-strict" / "_definitions.json").read_text())
    kuberay = yaml.safe_load(KUBERAY_SCHEMA.read_text())
    registry = Registry().with_resource(K8S_DEFINITIONS_URI, Resource.from_contents(defs))
    return {
        kind: jsonschema.Draft202012Validator({**kuberay, "$ref": f"#/$defs/{kind}"}, registry=registry)
        for kind in KUBERAY_KINDS
    }


def validate_kuberay(doc: dict[str, Any], version: str) -> None:
    """Validate a RayCluster or RayJob: KubeRay fields plus embedded core types (pod templates)."""
    validator = _kuberay_validators(version)[doc["kind"]]
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        raise error


def kuberay_cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
        return [doc["spec"]["rayClusterSpec"]]
    return []


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template in an object: workload templates and the templates inside Ray CRDs."""
    kind, spec = doc.get("kind"), doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return [spec["template"]]
    templates = []
    for cluster in kuberay_cluster_specs(doc):
        templates.append(cluster["headGroupSpec"]["template"])
        templates += [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    return templates


# --- Ray cluster launcher --------------------------------------------------------------------------


def ray_launcher_schema() -> dict[str, Any]:
    """The schema `ray up` validates against, from the installed Ray (found without importing Ray)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None, "ray is not installed (extra `train`)"
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


# --- Dockerfile: instructions in order, shell commands in RUN ---------------------------------------


@dataclass
class Step:
    """One instruction of a stage with the USER and WORKDIR in effect when it runs."""

    instr: str
    args: str
    user: str | None  # None: the base image's default user (not set in this stage yet)
    workdir: str


def parser_directives(text: str) -> list[str]:
    """`# key=value` lines at the top of a Dockerfile, which BuildKit reads as parser directives."""
    found = []
    for line in text.splitlines():
        m = re.fullmatch(r"#\s*([a-zA-Z]+)\s*=.*", line.strip())
        if not m:
            break
        found.append(m.group(1).lower())
    return found


@functools.cache
def dockerfile_steps() -> dict[str, list[Step]]:
    """The repository's Dockerfile as `parse_steps` gives it."""
    return parse_steps(DOCKERFILE.read_text())


def parse_steps(text: str) -> dict[str, list[Step]]:
    """Stage name (or index) -> its instructions in order, each with the USER and WORKDIR in effect."""
    global_args = {}
    for instr, rest in dockerfile_instructions(text):
        if instr == "FROM":
            break
        if instr == "ARG":
            key, default = _arg_default(rest)
            global_args[key] = default or ""
    out: dict[str, list[Step]] = {}
    steps: list[Step] = []
    user: str | None = None
    workdir = "/"
    for instr, rest in dockerfile_instructions(text):
        if instr == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(out))
            steps, user, workdir = [], None, "/"
            out[name] = steps
            continue
        if instr == "USER":
            user = _substitute(rest, global_args)
        elif instr == "WORKDIR":
            workdir = str(Path(workdir, rest))
        steps.append(Step(instr, rest, user, workdir))
    return out


def shell_commands(run_args: str) -> list[list[str]]:
    """The simple commands of a shell-form RUN, split at `&&`, `||`, `;` and `|` (quotes respected)."""
    import shlex

    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


# pip options that take a value (so the value is not a requirement)
_PIP_VALUE_OPTIONS = {
    "-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url", "-f",
    "--find-links", "-w", "--wheel-dir", "-t", "--target", "--root", "--prefix", "--cache-dir",
    "--timeout", "--retries", "--platform", "--python-version", "--implementation", "--abi",
}  # fmt: skip


@dataclass
class PipCall:
    command: str  # install / wheel / download
    requirements: list[str]  # positional arguments (requirement specifiers or paths)
    options: dict[str, list[str]]  # option -> values ('' for flags)


def pip_calls(run_args: str) -> list[PipCall]:
    """Every `pip install|wheel|download` (also `python -m pip ...`) in a RUN."""
    calls = []
    for cmd in shell_commands(run_args):
        for i, word in enumerate(cmd[:-1]):
            if Path(word).name in ("pip", "pip3") and cmd[i + 1] in ("install", "wheel", "download"):
                break
        else:
            continue
        reqs: list[str] = []
        options: dict[str, list[str]] = {}
        args = iter(cmd[i + 2 :])
        for arg in args:
            if arg.startswith("-"):
                key, eq, value = arg.partition("=")
                if not eq and key in _PIP_VALUE_OPTIONS:
                    value = next(args, "")
                options.setdefault(key, []).append(value)
            elif arg in (">", ">>", "2>", "<"):
                next(args, None)
            else:
                reqs.append(arg)
        calls.append(PipCall(cmd[i + 1], reqs, options))
    return calls


def is_local_path(req: str) -> bool:
    return req.startswith(("/", "./", "../")) or req == "." or req.endswith((".whl", ".tar.gz"))


def requirement_name(req: str) -> str:
    """'psycopg[binary]>=3' -> 'psycopg'; '"mlflow==${V}"' -> 'mlflow' (normalised, PEP 503)."""
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip("'\""))
    assert m, req
    return re.sub(r"[-_.]+", "-", m.group(0)).lower()


def requirement_extras(req: str) -> set[str]:
    m = re.search(r"\[([^\]]*)\]", req)
    return {e.strip().lower() for e in m.group(1).split(",")} if m else set()


def constraints() -> dict[str, str]:
    """constraints.txt as normalised name -> pinned version."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[requirement_name(name)] = version.strip()
    return pins


def dockerignore_allows(path: str) -> bool:
    """Whether the repository's .dockerignore lets `path` (relative) into the build context.

    Enough of Docker's rules for this repository's allow-list: the last matching pattern wins, `!` re-includes,
    a pattern matches the path or any parent folder (fnmatch's `*` also spans folders, like `**`).
    """
    import fnmatch

    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            allowed = line.startswith("!")
    return allowed
