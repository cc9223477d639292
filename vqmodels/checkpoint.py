"""Save and load models as a directory: `weights.pt` (a plain state dict) + `config.json` (type tag + config).

No pickled classes: `load` rebuilds the model from the JSON config and reads the weights with
`torch.load(weights_only=True)`, so a checkpoint is safe to load from a model registry and survives
refactors of the Python classes. `load_tokenizer` also accepts MLflow URIs (models:/, runs:/, ...), through a
fetcher its caller passes or an installed package registers (vqtrain's: `vqbase.fetch`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vqmodels.tokenizer import Tokenizer

WEIGHTS = "weights.pt"
CONFIG = "config.json"
FORMAT_VERSION = 1

# type tag -> (module, model class, config class)
MODELS = {
    "tokenizer": ("vqmodels.tokenizer", "Tokenizer", "TokenizerConfig"),
    "maskgit": ("vqmodels.maskgit", "MaskGIT", "MaskGITConfig"),
    "ar": ("vqmodels.ar", "ARTransformer", "ARConfig"),
}


def _model_tag(model: nn.Module) -> str:
    for tag, (module, cls, _) in MODELS.items():
        if isinstance(model, getattr(importlib.import_module(module), cls)):
            return tag
    raise TypeError(f"save: cannot save a {type(model).__name__}; known models: {sorted(MODELS)}")


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written checkpoint behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(model: nn.Module, directory: str | Path, *, inference_only: bool = False,
         extra: dict[str, Any] | None = None) -> Path:
    """Write `model`'s weights and config to `directory` (created if needed); returns the directory.

    inference_only: drop the discriminator's weights (what a registered tokenizer needs: encode/decode).
    extra: JSON data kept beside the config (a MaskGIT records the tokenizer version that decodes its codes
    under "tokenizer", and may name its classes under "class_names").
    """
    tag = _model_tag(model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if inference_only:
        state = {k: v for k, v in state.items() if not k.startswith("discriminator.")}
    meta = {
        "model": tag,
        "format_version": FORMAT_VERSION,
        "config": model.config_dict(),
        "inference_only": inference_only,
        "torch_version": torch.__version__,
        **({"extra": extra} if extra else {}),
    }
    _atomic_write(d / WEIGHTS, lambda p: torch.save(state, p))
    _atomic_write(d / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    return d


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory, checked for a known type tag."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG} here; not a vqmodels checkpoint directory")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("model") not in MODELS:
        got = meta.get("model") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: field 'model' must be one of {sorted(MODELS)}, got {got!r}")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than this vqmodels supports")
    return meta


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model (Tokenizer, MaskGIT or ARTransformer) from `directory`, in eval mode."""
    d = Path(directory)
    meta = read_meta(d)
    module, cls_name, cfg_name = MODELS[meta["model"]]
    mod = importlib.import_module(module)
    try:
        config = getattr(mod, cfg_name).from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{d / CONFIG}: bad config: {e}") from e
    weights = d / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    state = torch.load(weights, map_location=map_location, weights_only=True)
    kwargs: dict[str, Any] = {}
    if meta["model"] == "tokenizer":
        kwargs["discriminator"] = any(k.startswith("discriminator.") for k in state)
    model = getattr(mod, cls_name)(config, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not match the config in {CONFIG}: {e}") from e
    return model.to(map_location).eval()


def find_checkpoint(root: str | Path, model: str = "tokenizer") -> Path:
    """The shallowest directory under `root` whose config.json has `"model": model` (registry layouts nest
    the checkpoint, e.g. a pyfunc model's `artifacts/tokenizer/`)."""
    root = Path(root)
    candidates = sorted(root.rglob(CONFIG), key=lambda p: (len(p.parts), str(p)))
    for path in candidates:
        try:
            if json.loads(path.read_text()).get("model") == model:
                return path.parent
        except (OSError, ValueError, AttributeError):
            continue
    raise FileNotFoundError(f"{root}: no {CONFIG} with \"model\": {model!r} anywhere below")


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # models:/..., runs:/..., s3://..., file:///..., http(s)://...
FETCHERS = "vqmodels.fetchers"  # entry-point group: `vqtrain` registers its MLflow fetcher (vqbase.fetch) there

# fetch(uri, dst_dir, tracking_uri) -> local path holding the downloaded files
Fetch = Callable[[str, str, "str | None"], str]


def default_fetch() -> Fetch:
    """The fetcher an installed package registered under the `vqmodels.fetchers` entry point (vqtrain's reads
    MLflow URIs). The model library never imports MLflow itself: it asks its caller, or this registry."""
    found = sorted(importlib.metadata.entry_points(group=FETCHERS), key=lambda e: e.name)
    if not found:
        raise ImportError(
            f"no fetcher for model URIs is installed (entry point group {FETCHERS!r}); install vqtrain[train], "
            "pass fetch=, or give a local directory"
        )
    return found[0].load()


def load_tokenizer(
    uri: str | Path, map_location: str | torch.device = "cpu", tracking_uri: str | None = None,
    fetch: Fetch | None = None,
) -> Tokenizer:
    """A tokenizer from a local directory or an MLflow URI (`models:/name@alias`, `models:/name/3`,
    `runs:/<id>/path`, ...). See `load_model`."""
    return load_model(uri, "tokenizer", map_location, tracking_uri, fetch=fetch)  # type: ignore[return-value]


def load_model(
    uri: str | Path, model: str = "tokenizer", map_location: str | torch.device = "cpu",
    tracking_uri: str | None = None, with_meta: bool = False, fetch: Fetch | None = None,
) -> Any:
    """The saved `model` ("tokenizer", "maskgit", "ar") from a local directory or a URI; with `with_meta`,
    (model, the checkpoint's config.json).

    A URI is handed to `fetch(uri, dst_dir, tracking_uri)`, which downloads it and returns a local path
    (default: the registered `vqmodels.fetchers` entry point; vqtrain's resolves `models:/` against
    `tracking_uri`, default MLflow's own configuration, for the registry too).
    """
    def read(root: str | Path) -> Any:
        d = find_checkpoint(root, model)
        net = load(d, map_location)
        return (net, read_meta(d)) if with_meta else net

    local = Path(uri)
    if local.exists():
        return read(local)
    uri = str(uri)
    if not _URI.match(uri):
        raise FileNotFoundError(f"{uri}: neither a local directory nor an MLflow URI (models:/, runs:/, ...)")
    fetch = fetch or default_fetch()
    with tempfile.TemporaryDirectory(prefix="vqtokenizer-") as tmp:
        return read(fetch(uri, tmp, tracking_uri))


def load_generator(
    uri: str | Path, map_location: str | torch.device = "cpu", tracking_uri: str | None = None,
    tokenizer: str | Path | None = None, fetch: Fetch | None = None,
) -> tuple[nn.Module, Tokenizer]:
    """(MaskGIT, the tokenizer that decodes its codes) from a directory or MLflow URI. The tokenizer is the
    version the MaskGIT recorded when it was saved, unless `tokenizer` names one."""
    net, meta = load_model(uri, "maskgit", map_location, tracking_uri, with_meta=True, fetch=fetch)
    net.extra = dict(meta.get("extra") or {})  # what its job recorded: the tokenizer, the class names
    tok_uri = tokenizer or net.extra.get("tokenizer")
    if not tok_uri:
        raise ValueError(f"{uri}: this MaskGIT does not record its tokenizer; pass tokenizer=")
    return net, load_tokenizer(tok_uri, map_location, tracking_uri, fetch=fetch)
