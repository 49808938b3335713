"""serve.settings: defaults, .env, environment and CLI precedence, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("SIMPLENN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = load_settings([])
    assert (settings.host, settings.port, settings.model_name) == ("127.0.0.1", 8000, "simplenn")
    assert settings.weights == Path("weights/model.pth") and settings.model_class == "models.simple_nn:SimpleNN"
    assert settings.admin_token is None and settings.compile == "none"


def test_cli_beats_environment_beats_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SIMPLENN_PORT=7001\nSIMPLENN_MAX_ROWS=11\nSIMPLENN_MODEL_NAME=fromdotenv\n")
    monkeypatch.setenv("SIMPLENN_PORT", "7002")
    monkeypatch.setenv("SIMPLENN_MAX_ROWS", "12")
    settings = load_settings(["--port", "7003"])
    assert settings.port == 7003 and settings.max_rows == 12 and settings.model_name == "fromdotenv"


@pytest.mark.parametrize(("argv", "words"), [
    (["--port", "0"], ["SIMPLENN_PORT (--port)", "greater than or equal to 1"]),
    (["--device", "tpu"], ["SIMPLENN_DEVICE", "auto, cpu, cuda or cuda:N"]),
    (["--model-class", "not a path"], ["SIMPLENN_MODEL_CLASS", "module:ClassName"]),
    (["--compile", "fast"], ["SIMPLENN_COMPILE", "none", "torchscript"]),
    (["--batch-timeout-ms", "-1"], ["SIMPLENN_BATCH_TIMEOUT_MS"]),
])
def test_bad_values_name_the_setting(argv: list[str], words: list[str], capsys) -> None:
    try:
        load_settings(argv)
    except SettingsError as exc:
        message = str(exc)
    except SystemExit:  # argparse refuses a choice before pydantic sees it
        message = capsys.readouterr().err
    else:
        raise AssertionError("accepted")
    for word in words:
        assert word in message, message


def test_api_servers_auto_is_bounded() -> None:
    assert 1 <= Settings().resolved_api_servers() <= 2
    assert Settings(api_servers=3).resolved_api_servers() == 3
