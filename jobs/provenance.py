"""Where a run came from, as MLflow's UI shows it: who submitted it ("Created by"), which vqtrain job and spec
("Source", and the run's description), the shard sets it trained and evaluated on ("Datasets": each a source
URI with a digest of its manifest), and an experiment set up for model training (MLflow 3 otherwise opens a
new experiment in its GenAI view, an empty "Traces" page).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag

from vqbase.protocol import USER_ENV  # set by the service: the name of the token that submitted the job

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's "model training" experiment type
UI_VIEW = "workflowType=machine_learning"  # the same choice as a URL parameter, for links to existing experiments
DIGEST_LENGTH = 16  # hex characters; MLflow keeps at most 36


@dataclass(frozen=True)
class ShardDataset:
    """One split's shard set as an MLflow dataset."""

    name: str
    digest: str
    source: str
    num_samples: int | None
    num_shards: int
    kind: str  # "images" | "tokens"

    def entity(self) -> Dataset:
        schema = {"mlflow_colspec": [
            {"name": "tokens.npy" if self.kind == "tokens" else "image", "type": "binary"},
            {"name": "cls", "type": "long"},
        ]}
        profile = {"num_rows": self.num_samples, "num_shards": self.num_shards, "format": f"webdataset ({self.kind})"}
        return Dataset(name=self.name, digest=self.digest, source_type=_source_type(self.source),
                       source=json.dumps({"uri": self.source}), schema=json.dumps(schema), profile=json.dumps(profile))


def submitted_by() -> str:
    """The service's token name when the service submitted the job, else the local user."""
    user = os.environ.get(USER_ENV, "").strip()
    if user:
        return user[:100]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def run_tags(job_id: str, kind: str) -> dict[str, str]:
    """Tags that fill the run page's "Created by" and "Source"."""
    return {"mlflow.user": submitted_by(), "mlflow.source.name": f"vqtrain {kind} job {job_id}",
            "mlflow.source.type": "JOB"}


def prepare_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Mark the experiment as model training, once (a user's own choice in the UI is kept)."""
    exp = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def with_training_view(url: str) -> str:
    """A UI link that opens in the model-training view whatever the experiment's type."""
    return f"{url}{'&' if '?' in url else '?'}{UI_VIEW}"


def shard_dataset(source: str | list[str], storage_options: dict[str, Any] | None,
                  allowed_roots: Any = None) -> ShardDataset:
    """The shard set behind a spec's `data.train`/`data.eval`: named and digested by its manifest (the shards'
    sha256 and sample counts) when it has one, else by its shard URLs."""
    from jobs.data.manifest import resolve_shards

    shards = resolve_shards(source, storage_options, allowed_roots)
    m = shards.manifest
    listed = _short(source)  # MLflow keeps a dataset source of at most 64 KiB
    if m is not None:  # the manifest's facts about the shards chosen (a pattern may pick some of them)
        by_name = {s.url.rsplit("/", 1)[-1]: s for s in m.shards}
        chosen = [by_name.get(u.rsplit("/", 1)[-1]) for u in shards.urls]
        basis = json.dumps([[u.rsplit("/", 1)[-1], s.samples if s else None, s.sha256 if s else None]
                            for u, s in zip(shards.urls, chosen, strict=True)] + [m.kind, m.class_names])
        name, kind = m.name or _basename(shards.manifest_url or listed), m.kind
        where = shards.manifest_url if len(shards.urls) == len(m.shards) else listed
    else:
        basis = json.dumps(sorted(shards.urls))
        name, kind, where = _basename(source if isinstance(source, str) else source[0]), "images", listed
    digest = hashlib.sha256(basis.encode()).hexdigest()[:DIGEST_LENGTH]
    return ShardDataset(name, digest, where or listed, shards.num_samples, len(shards.urls), kind)


def log_datasets(client: MlflowClient, run_id: str, splits: dict[str, ShardDataset]) -> None:
    """The splits as the run's dataset inputs, each with its context ("training", "evaluation")."""
    inputs = [DatasetInput(ds.entity(), tags=[InputTag("mlflow.data.context", context)])
              for context, ds in splits.items()]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def spec_datasets(spec: Any, allowed_roots: Any = None) -> dict[str, ShardDataset]:
    """{"training": ..., "evaluation": ...} for the splits a spec names; a split that cannot be read here
    is left out (the job itself reports why)."""
    out: dict[str, ShardDataset] = {}
    for context, source in (("training", spec.data.train), ("evaluation", spec.data.eval)):
        if source is None:
            continue
        try:
            out[context] = shard_dataset(source, spec.data.storage_options, allowed_roots)
        except Exception:  # noqa: BLE001 - unreadable here (credentials only on the workers, ...): left out
            continue
    return out


def run_description(spec: Any, job_id: str, model_uri: str | None = None) -> str:
    """The run's description (markdown, MLflow's `mlflow.note.content`): what the job is and where its
    model goes."""
    lines = [f"**vqtrain {spec.kind} job** `{job_id}`, submitted by {submitted_by()}.", ""]
    if spec.data.train:
        lines.append(f"- training data: `{_short(spec.data.train)}`")
    if spec.data.eval:
        lines.append(f"- evaluation data: `{_short(spec.data.eval)}`")
    if getattr(spec, "tokenizer", None):
        lines.append(f"- tokenizer: `{spec.tokenizer}`")
    if getattr(spec, "evaluate", None):
        lines.append(f"- model evaluated: `{spec.evaluate}`")
    if spec.kind in ("tokenizer", "maskgit"):
        lines.append(f"- steps: {spec.optim.steps} on {spec.resources.workers} worker(s), "
                     f"batch {spec.optim.batch_size} per worker")
        target = model_uri or (f"models:/{spec.model_name}@{spec.register.alias}" if spec.register.alias
                               else f"models:/{spec.model_name}/<version>")
        lines.append(f"- registers: `{target}` (pull with `vqtrain pull {target.removeprefix('models:/')}`)")
    lines += ["", "The whole spec (redacted) is the artifact `spec/spec.yaml`; every field is also a parameter."]
    return "\n".join(lines)


def _short(source: str | list[str]) -> str:
    return source if isinstance(source, str) else f"{source[0]} (+{len(source) - 1} more)"


def _basename(url: str) -> str:
    parts = [p for p in url.rstrip("/").split("/") if p]
    base = parts[-1].removesuffix(".json").removesuffix("manifest").strip("-_.") if parts else ""
    return base or (parts[-2] if len(parts) > 1 else url) or "shards"


def _source_type(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else "local"
    return {"file": "local", "https": "http"}.get(scheme, scheme)
