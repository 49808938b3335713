"""File -> verified, warmed-up module (TF Serving's "loader").

``load_model`` never unpickles arbitrary objects (``torch.load(..., weights_only=True)`` or safetensors),
checks keys, shapes, dtypes and finiteness against the architecture with one clear message per
problem, optionally scripts the module and checks it against eager, runs a warm-up forward pass and
an optional golden check, and only then hands the module out. Nothing here touches CUDA at import.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from serve.errors import WeightsError
from serve.versions import read_weights

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
_PROBE_ROWS = 8
_logged_warnings: set[str] = set()


@dataclass(frozen=True)
class LoadedModel:
    """A module that passed every check, ready to serve, with the identity of the file it came from."""

    module: nn.Module
    version: str
    path: Path
    sha256: str
    device: torch.device
    loaded_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class LoadOptions:
    """What ``load_model`` needs besides the file: the architecture, device and checks."""

    model_class: str
    device: torch.device
    compile: str = "none"
    max_bytes: int = 1 << 30
    golden: Path | None = None
    golden_tolerance: float = 1e-4


def import_model_class(spec: str) -> type[nn.Module]:
    """Import ``'package.module:Class'`` and check it is an ``nn.Module`` subclass."""
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import model class {spec!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model class {spec!r} is not a torch.nn.Module subclass")
    return cls


def input_features(cls: type[nn.Module]) -> int:
    """How many numbers one input row has: the class's ``in_features``, else its first Linear layer's."""
    declared = getattr(cls, "in_features", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    for layer in cls().modules():
        if isinstance(layer, nn.Linear):
            return layer.in_features
    raise ValueError(f"{cls.__name__} declares no 'in_features' and has no nn.Linear layer to infer it from")


def resolve_device(setting: str, assigned: str | None = None) -> torch.device:
    """The device to serve on: ``cpu``/``cuda:N`` as set; ``auto``/``cuda`` take LitServe's assignment
    (``cpu`` or ``cuda:k``) when given, else CUDA when available. A CUDA device must exist."""
    if setting in ("auto", "cuda") and assigned:
        setting = assigned if (setting == "auto" or assigned.startswith("cuda")) else setting
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"SIMPLENN_DEVICE={setting} but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"SIMPLENN_DEVICE={setting} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def read_state_dict(path: Path, data: bytes, device: torch.device) -> dict[str, torch.Tensor]:
    """Deserialize without running code: safetensors, or ``torch.load(weights_only=True)``."""
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load as load_safetensors

            state = {k: v.to(device) for k, v in load_safetensors(data).items()}
        else:
            state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad archive; all mean "cannot read"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            detail = "holds Python objects other than tensors (refused: weights_only=True); save model.state_dict()"
        raise WeightsError(path, f"cannot be read as a state_dict: {detail[:300]}", "unreadable") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise WeightsError(path, f"is not a state_dict (a mapping of names to tensors): got {type(state).__name__}",
                           "not_state_dict")
    return dict(state)


def check_state_dict(path: Path, state: Mapping[str, object], module: nn.Module) -> None:
    """Strict keys, shapes, floating dtypes and finite values, with the offending key and shapes named."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise WeightsError(path, f"does not fit {type(module).__name__}: " + ", ".join(parts), "mismatch")
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise WeightsError(path, f"key {key!r} holds {type(got).__name__}, not a tensor", "mismatch")
        if tuple(got.shape) != tuple(want.shape):
            raise WeightsError(
                path, f"key {key!r} has shape {list(got.shape)}, {type(module).__name__} expects {list(want.shape)}",
                "mismatch")
        if want.is_floating_point() and not got.is_floating_point():
            raise WeightsError(path, f"key {key!r} has dtype {got.dtype}, expected a floating dtype ({want.dtype})",
                               "mismatch")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise WeightsError(path, f"key {key!r} holds NaN or infinite values", "not_finite")


def _log_once(caught: list[warnings.WarningMessage]) -> None:
    for item in caught:
        text = str(item.message)
        if text not in _logged_warnings:
            _logged_warnings.add(text)
            logger.info("torch: %s", text.splitlines()[0])


def script_module(path: Path, module: nn.Module, probe: torch.Tensor) -> nn.Module:
    """TorchScript the module and check it agrees with eager on a probe batch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scripted = torch.jit.script(module)
        except Exception as exc:
            raise WeightsError(path, f"cannot be compiled to TorchScript: {str(exc).splitlines()[0]}", "compile") \
                from None
    _log_once(caught)
    with torch.inference_mode():
        eager_out, scripted_out = module(probe), scripted(probe)
    if not torch.allclose(eager_out, scripted_out, rtol=1e-5, atol=1e-6):
        raise WeightsError(path, "TorchScript output differs from eager on the probe batch", "compile")
    return scripted


def check_golden(path: Path, module: nn.Module, options: LoadOptions) -> None:
    """Compare outputs on the golden file's inputs with its expected outputs (``{"inputs", "outputs"}``)."""
    assert options.golden is not None
    try:
        golden = json.loads(options.golden.read_text())
        inputs = torch.tensor(golden["inputs"], dtype=torch.float32, device=options.device)
        expected = torch.tensor(golden["outputs"], dtype=torch.float32).reshape(len(inputs), -1)
    except Exception as exc:
        raise WeightsError(path, f"golden file {options.golden} is unusable: {exc}", "golden") from None
    with torch.inference_mode():
        got = module(inputs).float().cpu().reshape(len(inputs), -1)
    worst = float((got - expected).abs().max())
    if worst > options.golden_tolerance:
        raise WeightsError(path, f"golden check failed: max abs error {worst:.3g} > {options.golden_tolerance}",
                           "golden")


def load_model(path: Path, options: LoadOptions, expected_sha256: str | None = None,
               origin: Path | None = None) -> LoadedModel:
    """Build the architecture and load ``path`` into it, verifying everything before returning.

    ``origin`` is the file the bytes came from (``path`` may be its pinned snapshot): errors name it.
    Raises ``WeightsError`` (with ``reason``) for any file that must not be served.
    """
    shown = origin or path
    data, version, digest = read_weights(path, options.max_bytes, expected_sha256, shown)
    state = read_state_dict(shown, data, options.device)
    module = import_model_class(options.model_class)()
    check_state_dict(shown, state, module)
    module.load_state_dict(state, strict=True)
    module = module.to(options.device).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    probe = torch.randn(_PROBE_ROWS, input_features(type(module)), generator=torch.Generator().manual_seed(0))
    probe = probe.to(options.device)
    if options.compile == "torchscript":
        module = script_module(shown, module, probe)
    with torch.inference_mode():
        warm = module(probe)
    if warm.shape[0] != _PROBE_ROWS or not bool(torch.isfinite(warm).all()):
        raise WeightsError(shown, f"warm-up gave shape {list(warm.shape)} or non-finite outputs", "warmup")
    if options.golden is not None:
        check_golden(shown, module, options)
    return LoadedModel(module=module, version=version, path=shown, sha256=digest, device=options.device)
