"""The reference metric packages (torch-fidelity, lpips), loaded from `.venv/reference` without their
package `__init__`s, which import torchvision (unimportable beside torch's CPU build).

Only what the packages' own network and metric modules need is stood in for: torch-fidelity's `utils`
(dataset plumbing, unused by the functions called) and, for lpips, torchvision's `models.vgg16` /
`models.alexnet`, whose `features` are the plain torchvision layer stacks (built by
`vqmodels.metrics.lpips.backbone`, whose key layout the tests check against torchvision's state dicts).
What is compared is therefore the packages' own code: TF-exact resizing, the Inception graph, the FID and
IS formulas, and LPIPS's scaling, normalisation, taps and linear heads.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / ".venv" / "reference"


_LOADED: dict[str, types.ModuleType] = {}


def torch_fidelity(module: str) -> types.ModuleType:
    """`torch_fidelity.<module>` from the reference folder. The stand-in package is in `sys.modules` only
    while it loads (a module without a spec there would break `find_spec`, which torchmetrics calls)."""
    name = f"torch_fidelity.{module}"
    if name in _LOADED:
        return _LOADED[name]
    folder = ROOT / "torch_fidelity"
    if not folder.is_dir():
        pytest.fail(f"reference package torch_fidelity missing in {ROOT}: run scripts/setup")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(folder)]  # submodules import from here; __init__ (torchvision) never runs
    utils = types.ModuleType("torch_fidelity.utils")
    utils.__getattr__ = lambda attr: None  # names metric_fid/metric_isc import but the tests never call
    sys.modules.update({"torch_fidelity": pkg, "torch_fidelity.utils": utils})
    try:
        _LOADED[name] = importlib.import_module(name)
    finally:
        for key in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[key]
    return _LOADED[name]


def lpips_module() -> types.ModuleType:
    """The lpips package, imported for real with torchvision's two backbones stood in (the stand-in is
    removed from `sys.modules` again so no other test sees a torchvision)."""
    from vqmodels.metrics.lpips import backbone

    if "lpips" in _LOADED:
        return _LOADED["lpips"]
    if not (ROOT / "lpips").is_dir():
        pytest.fail(f"reference package lpips missing in {ROOT}: run scripts/setup")

    def factory(net: str):
        def make(pretrained: bool = False, **_: object) -> types.SimpleNamespace:
            assert not pretrained, "the tests never ask for downloaded weights"
            return types.SimpleNamespace(features=backbone(net))
        return make

    tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.vgg16, models.alexnet = factory("vgg"), factory("alex")
    tv.models = models
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
    sys.modules.update({"torchvision": tv, "torchvision.models": models})
    sys.path.insert(0, str(ROOT))
    try:
        _LOADED["lpips"] = importlib.import_module("lpips")
        return _LOADED["lpips"]
    finally:
        sys.path.remove(str(ROOT))
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
