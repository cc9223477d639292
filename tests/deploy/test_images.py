"""The Dockerfile builds and its images run what was tested — offline, by reading the Dockerfile.

Each test here stands for a defect that once broke `docker build` or a container at start-up:
a file COPY'd as root and then deleted by the non-root user, an MLflow image without the PostgreSQL
driver SQLAlchemy actually imports, images resolving other versions than constraints.txt, and a
`# syntax=` line that makes BuildKit pull a frontend image from Docker Hub.
"""

from __future__ import annotations

import importlib.metadata
import os
import posixpath
import re
import subprocess

import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.deploy import deployfiles as df

STANDIN_OVERRIDE = df.DEPLOY / "standins" / "compose.override.yaml"

# Shell commands that delete or change the files they name (for sed, only with -i).
CHANGING = {"rm", "mv", "chmod", "unlink", "truncate", "shred", "touch", "tee", "sed"}


def _is_root(user: str | None) -> bool:
    return user is None or user.split(":")[0] in ("0", "root")


def changed_paths(run_args: str, workdir: str) -> list[str]:
    """Absolute paths a RUN deletes, moves, rewrites or redirects output into."""
    paths = []
    for cmd in df.shell_commands(run_args):
        words = cmd[1:] if posixpath.basename(cmd[0]) == "sudo" else cmd
        prog = posixpath.basename(words[0])
        args = [w for w in words[1:] if not w.startswith("-")]
        if prog == "sed":
            if not any(w.startswith("-i") or w == "--in-place" for w in words):
                args = []
            elif "-e" not in words:
                args = args[1:]  # the script
        elif prog == "chmod":
            args = args[1:]  # the mode
        elif prog not in CHANGING:
            args = []
        for i, word in enumerate(words[:-1]):
            if word in (">", ">>"):
                args.append(words[i + 1])
        paths += [posixpath.normpath(posixpath.join(workdir, a)) for a in args]
    return paths


def copied_paths(step: df.Step) -> list[str]:
    """Absolute paths a COPY creates: DEST for a folder's contents or a single renamed file, else DEST/NAME."""
    words = [w for w in step.args.split() if not w.startswith("--")]
    sources, dest = words[:-1], words[-1]
    into_folder = dest.endswith("/") or len(sources) > 1
    dest = posixpath.normpath(posixpath.join(step.workdir, dest))
    out = []
    from_stage = any(w.startswith("--from=") for w in step.args.split())
    for src in sources:
        is_dir = src.endswith("/") or (not from_stage and (df.REPO / src).is_dir())
        out.append(dest if is_dir or not into_folder else posixpath.join(dest, posixpath.basename(src)))
    return out


def chown_user(step: df.Step) -> str | None:
    for word in step.args.split():
        if word.startswith("--chown="):
            return word.removeprefix("--chown=").split(":")[0]
    return None


def chown_violations(steps: dict[str, list[df.Step]]) -> list[str]:
    """COPYs whose files a later RUN of a non-root USER deletes or changes, without --chown to that user."""
    problems = []
    for stage_name, stage_steps in steps.items():
        for i, copy in enumerate(stage_steps):
            if copy.instr not in ("COPY", "ADD"):
                continue
            targets = copied_paths(copy)
            for run in stage_steps[i + 1 :]:
                if run.instr != "RUN" or _is_root(run.user):
                    continue
                for path in changed_paths(run.args, run.workdir):
                    hit = any(
                        path == t or path.startswith(t + "/") or t.startswith(path + "/") for t in targets
                    )
                    if hit and chown_user(copy) != run.user.split(":")[0]:
                        problems.append(
                            f"stage {stage_name}: `COPY {copy.args}` is owned by root (no --chown="
                            f"{run.user}), but `RUN` as {run.user} changes {path}"
                        )
    return problems


def test_no_parser_directive_needing_a_registry() -> None:
    # `# syntax=docker/dockerfile:1` makes BuildKit pull the frontend image from Docker Hub at build time;
    # the Dockerfile must build offline from Docker Hub and with the legacy builder.
    assert "syntax" not in df.parser_directives(df.DOCKERFILE.read_text())


def test_chown_check_flags_a_root_owned_copy_removed_by_the_user() -> None:
    bad = df.parse_steps(
        "FROM a AS w\nRUN true\nFROM b AS r\nUSER 1000:100\nWORKDIR /app\n"
        "COPY --from=w /dist/ /tmp/dist/\nRUN pip install /tmp/dist/*.whl && rm -rf /tmp/dist\n"
        "COPY x.txt ./\nRUN sed -i s/a/b/ x.txt\n"
    )
    assert len(chown_violations(bad)) == 2
    good = df.parse_steps(
        "FROM b AS r\nUSER 1000:100\nCOPY --from=w --chown=1000:100 /dist/ /tmp/dist/\nRUN rm -rf /tmp/dist\n"
    )
    assert chown_violations(good) == []


def test_files_a_non_root_run_changes_are_copied_with_its_owner() -> None:
    assert chown_violations(df.dockerfile_steps()) == []


# --- MLflow's PostgreSQL driver --------------------------------------------------------------------


def backend_store_uris() -> list[str]:
    """Every MLflow backend-store URI in compose.yaml and deploy/k8s (env or --backend-store-uri)."""
    uris = []
    envs, args = [], []
    for svc in df.compose()["services"].values():
        envs.append(svc.get("environment") or {})
        args += svc.get("command") or []
    for _, doc in df.k8s_documents():
        for template in df.pod_templates(doc):
            for c in template["spec"]["containers"]:
                envs.append({v["name"]: v.get("value", "") for v in c.get("env", [])})
                args += c.get("args", []) + c.get("command", [])
    for env in envs:
        if "MLFLOW_BACKEND_STORE_URI" in env:
            uris.append(env["MLFLOW_BACKEND_STORE_URI"])
    uris += [a.partition("=")[2] for a in args if str(a).startswith("--backend-store-uri=")]
    return [re.sub(r"\$\{[^}]*\}|\$\([^)]*\)", "x", u) for u in uris]


KNOWN_DRIVERS = {"psycopg": {"psycopg"}, "psycopg2": {"psycopg2", "psycopg2-binary"}, "pg8000": {"pg8000"}}


def distributions_providing(module: str) -> set[str]:
    found = importlib.metadata.packages_distributions().get(module, [])
    return {df.requirement_name(d) for d in found} | KNOWN_DRIVERS.get(module, set())


def stage_requirements(stage_name: str) -> list[str]:
    reqs = []
    for step in df.dockerfile_steps()[stage_name]:
        if step.instr == "RUN":
            for call in df.pip_calls(step.args):
                if call.command == "install":
                    reqs += [r for r in call.requirements if not df.is_local_path(r)]
    return reqs


def test_mlflow_image_has_the_driver_sqlalchemy_imports_for_its_backend_store() -> None:
    uris = backend_store_uris()
    assert uris, "no MLFLOW_BACKEND_STORE_URI found in compose.yaml or deploy/k8s"
    installed = {df.requirement_name(r): r for r in stage_requirements("mlflow")}
    for uri in uris:
        url = make_url(uri)
        if url.get_backend_name() == "sqlite":
            continue
        # The pinned SQLAlchemy decides which module `postgresql://` imports (2.x: psycopg2; 2.1: psycopg).
        module = url.get_dialect().driver
        providers = distributions_providing(module)
        assert providers & installed.keys(), (
            f"{uri.split('@')[-1]}: SQLAlchemy {importlib.metadata.version('sqlalchemy')} imports {module!r}, "
            f"which none of the mlflow stage's packages ({sorted(installed)}) provides; install {sorted(providers)}"
        )
        if module == "psycopg":
            # The slim Python image has no libpq: psycopg needs its bundled one.
            req = installed["psycopg"]
            assert df.requirement_extras(req) & {"binary", "c"} or "psycopg-binary" in installed, req


# --- constraints.txt -------------------------------------------------------------------------------


def constraint_copies(stage_steps: list[df.Step]) -> dict[str, str]:
    """Destination path -> source, for the COPYs of constraints.txt in a stage."""
    out = {}
    for step in stage_steps:
        if step.instr == "COPY" and not any(w.startswith("--from=") for w in step.args.split()):
            words = [w for w in step.args.split() if not w.startswith("--")]
            for src, dest in zip(words[:-1], copied_paths(step), strict=True):
                if posixpath.basename(src) == "constraints.txt":
                    out[dest] = src
    return out


def test_every_third_party_pip_install_uses_constraints_txt() -> None:
    calls = 0
    for stage_name, steps in df.dockerfile_steps().items():
        for step in steps:
            if step.instr != "RUN":
                continue
            for call in df.pip_calls(step.args):
                third_party = (
                    "-r" in call.options
                    or "--requirement" in call.options
                    or any(not df.is_local_path(r) for r in call.requirements)
                )
                if not third_party and "--no-deps" in call.options:
                    continue  # the project's own wheel, nothing resolved
                calls += 1
                given = call.options.get("-c", []) + call.options.get("--constraint", [])
                assert given, (
                    f"stage {stage_name}: `pip {call.command}` without -c constraints.txt: {step.args}"
                )
                copies = constraint_copies(steps[: steps.index(step)])
                for path in given:
                    resolved = posixpath.normpath(posixpath.join(step.workdir, path))
                    assert resolved in copies, (
                        f"stage {stage_name}: -c {path} is not a COPY of constraints.txt"
                    )
    assert calls >= 3  # mlflow, torch, the dependencies
    assert df.dockerignore_allows("constraints.txt"), ".dockerignore keeps constraints.txt out of the build"


def test_dockerignore_reader() -> None:
    assert df.dockerignore_allows("pyproject.toml") and df.dockerignore_allows("vqmodels/__init__.py")
    assert not df.dockerignore_allows(".venv/bin/python") and not df.dockerignore_allows(
        "jobs/__pycache__/x.pyc"
    )


def test_pinned_packages_the_images_install_match_constraints() -> None:
    pins = df.constraints()
    for stage_name in ("mlflow", "runtime"):
        args = {**df.dockerfile()[0], **df.stage(stage_name).args}
        for req in stage_requirements(stage_name):
            name = df.requirement_name(req)
            assert name in pins, f"stage {stage_name} installs {name}, which constraints.txt does not pin"
            m = re.search(r"==\s*([^\"',;\s]+)", req.strip("'\""))
            if m:
                version = df._substitute(m.group(1), args)
                assert version == pins[name], (
                    f"stage {stage_name}: {req} -> {version}, constraints.txt {pins[name]}"
                )
    # The runtime's dependency layer installs pyproject.toml's requirements for EXTRAS: all pinned there too.
    project = df.pyproject()["project"]
    extras = df.stage("runtime").args["EXTRAS"].split(",")
    for req in project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]:
        assert df.requirement_name(req) in pins, f"{req}: not in constraints.txt"


# --- deploy/check and its stand-ins -----------------------------------------------------------------


def test_standin_override_only_swaps_images() -> None:
    services = df.compose()["services"]
    override = yaml.safe_load(STANDIN_OVERRIDE.read_text())["services"]
    for name, svc in override.items():
        assert name in services and set(svc) == {"image"}, name
        assert svc["image"].startswith("vqtrain-standin/"), svc
        assert not services[name]["image"].startswith("vqtrain-standin/"), (
            "compose.yaml keeps the real images"
        )


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs bash")
def test_deploy_check_is_an_executable_bash_script() -> None:
    check = df.DEPLOY / "check"
    assert os.access(check, os.X_OK)
    subprocess.run(["bash", "-n", str(check)], check=True)


def test_deploy_check_passed_on_the_current_deploy_files() -> None:
    """deploy/check needs Docker and minutes, so CI does not run it; instead deploy/README.md records the
    digest of the files its last PASS tested, and this fails when they have changed since."""
    import runpy

    digest = runpy.run_path(str(df.REPO / "deploy" / "standins" / "inputs_digest.py"))["inputs_digest"]()
    recorded = re.search(r"tested deploy inputs `([0-9a-f]{12})`", (df.REPO / "deploy" / "README.md").read_text())
    assert recorded, "deploy/README.md records no deploy/check run"
    assert recorded.group(1) == digest, (
        f"the Dockerfile or deploy files changed since deploy/check last passed ({recorded.group(1)} -> {digest}): "
        "run deploy/check and record its tail and digest in deploy/README.md"
    )
