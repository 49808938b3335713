"""serve.loader: good files load and verify; every kind of bad file is refused with a clear reason."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from serve.errors import WeightsError
from serve.loader import LoadOptions, input_features, load_model, resolve_device
from tests.conftest import SHIPPED_WEIGHTS, _RunsCode, make_state_dict, reference_outputs, save_weights
from models.simple_nn import SimpleNN

CPU = LoadOptions("models.simple_nn:SimpleNN", torch.device("cpu"))


def _refused(path: Path, options: LoadOptions = CPU, **kwargs) -> WeightsError:
    with pytest.raises(WeightsError) as info:
        load_model(path, options, **kwargs)
    assert str(path) in info.value.message
    return info.value


def test_shipped_weights_load_and_answer_like_the_model() -> None:
    loaded = load_model(SHIPPED_WEIGHTS, CPU)
    assert loaded.version == hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).hexdigest()[:12]
    x = torch.randn(4, 10)
    with torch.inference_mode():
        got = loaded.module(x)[:, 0].numpy()
    assert got.tolist() == pytest.approx(reference_outputs(SHIPPED_WEIGHTS, x.numpy()).tolist(), rel=1e-6)
    assert not loaded.module.training


def test_torchscript_mode_gives_a_script_module_with_the_same_answers() -> None:
    eager = load_model(SHIPPED_WEIGHTS, CPU).module
    scripted = load_model(SHIPPED_WEIGHTS, LoadOptions(CPU.model_class, CPU.device, "torchscript")).module
    assert isinstance(scripted, torch.jit.ScriptModule)
    x = torch.randn(16, 10)
    with torch.inference_mode():
        assert torch.allclose(eager(x), scripted(x))


def test_safetensors_files_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = make_state_dict(3)
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path / "model.safetensors", CPU)
    assert torch.equal(loaded.module.state_dict()["fc1.weight"], state["fc1.weight"])


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    state = make_state_dict(1)
    state["fc1.weight"] = torch.zeros(5, 9)
    error = _refused(save_weights(tmp_path / "m.pth", state))
    assert "fc1.weight" in error.message and "[5, 9]" in error.message and "[5, 10]" in error.message
    assert error.reason == "mismatch"


def test_wrong_keys_are_named(tmp_path: Path) -> None:
    state = make_state_dict(1)
    state["layer1.weight"] = state.pop("fc1.weight")
    error = _refused(save_weights(tmp_path / "m.pth", state))
    assert "missing keys ['fc1.weight']" in error.message and "unexpected keys ['layer1.weight']" in error.message


def test_nan_and_inf_values_are_refused(tmp_path: Path) -> None:
    for bad in (float("nan"), float("inf")):
        state = make_state_dict(1)
        state["fc2.bias"][0] = bad
        error = _refused(save_weights(tmp_path / "m.pth", state))
        assert "fc2.bias" in error.message and error.reason == "not_finite"


def test_integer_dtype_is_refused(tmp_path: Path) -> None:
    state = make_state_dict(1)
    state["fc1.weight"] = torch.ones(5, 10, dtype=torch.int64)
    assert "dtype" in _refused(save_weights(tmp_path / "m.pth", state)).message


def test_a_whole_pickled_model_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save(SimpleNN(), tmp_path / "whole.pth")
    assert "state_dict" in _refused(tmp_path / "whole.pth").message


def test_a_tensor_is_not_a_state_dict(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    assert _refused(tmp_path / "tensor.pth").reason == "not_state_dict"


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04 truncated zip"], ids=["empty", "random", "zip"])
def test_unreadable_bytes_are_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.pth").write_bytes(content)
    assert _refused(tmp_path / "bad.pth").reason == "unreadable"


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    good = SHIPPED_WEIGHTS.read_bytes()
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 2])
    assert _refused(tmp_path / "cut.pth").reason == "unreadable"


def test_a_pickle_that_would_run_code_never_runs_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _RunsCode(marker)
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"fc1.weight": payload}))
    torch.save({"fc1.weight": payload}, tmp_path / "evil-zip.pth")
    for name in ("evil.pth", "evil-zip.pth"):
        _refused(tmp_path / name)
    assert not marker.exists()


def test_sidecar_digest_must_match(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "m.pth", make_state_dict(1))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_model(path, CPU, expected_sha256=digest).sha256 == digest
    assert _refused(path, expected_sha256="0" * 64).reason == "digest"


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "m.pth", make_state_dict(1))
    small = LoadOptions(CPU.model_class, CPU.device, max_bytes=1024)
    assert _refused(path, small).reason == "too_large"


def test_missing_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    assert _refused(tmp_path / "absent.pth").reason == "unreadable"
    (tmp_path / "loop.pth").symlink_to(tmp_path / "loop.pth")
    assert _refused(tmp_path / "loop.pth").reason == "unreadable"


def test_golden_check_passes_for_matching_and_fails_for_other_weights(tmp_path: Path) -> None:
    good = save_weights(tmp_path / "good.pth", make_state_dict(1))
    other = save_weights(tmp_path / "other.pth", make_state_dict(2))
    inputs = torch.randn(5, 10)
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"inputs": inputs.tolist(),
                                  "outputs": reference_outputs(good, inputs.numpy()).tolist()}))
    options = LoadOptions(CPU.model_class, CPU.device, golden=golden, golden_tolerance=1e-5)
    assert load_model(good, options).version
    assert _refused(other, options).reason == "golden"


def test_input_features_from_the_class_or_its_first_linear() -> None:
    assert input_features(SimpleNN) == 10

    class NoDeclaration(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(7, 2))

    assert input_features(NoDeclaration) == 7


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", assigned="cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_weights_cross_devices(tmp_path: Path) -> None:
    cpu_saved = save_weights(tmp_path / "cpu.pth", make_state_dict(1))
    gpu_saved = save_weights(tmp_path / "gpu.pth", {k: v.cuda() for k, v in make_state_dict(1).items()})
    on_gpu = load_model(cpu_saved, LoadOptions(CPU.model_class, torch.device("cuda:0")))
    on_cpu = load_model(gpu_saved, CPU)
    assert next(on_gpu.module.parameters()).is_cuda and not next(on_cpu.module.parameters()).is_cuda
    x = torch.randn(8, 10)
    with torch.inference_mode():
        assert torch.allclose(on_gpu.module(x.cuda()).cpu(), on_cpu.module(x), atol=1e-5)
