"""Reading feature-network weights from a local file: the only way weights enter `vqmodels`.

Fetching them (s3://, http(s)://, MLflow artifacts, the per-node cache, sha256) is the caller's job
(`jobs.eval_weights`); here a missing file is an error that names the field, never a download.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_state(path: str | Path, field: str) -> dict[str, torch.Tensor]:
    """A state dict from `path`, read with `weights_only=True` (a weights file cannot run code)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{field}: weights file {str(p)!r} does not exist (nothing is downloaded)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise ValueError(f"{field}: cannot read {str(p)!r} as a torch state dict: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{field}: {str(p)!r} holds a {type(state).__name__}, not a state dict")
    return state
