"""The model cache: home resolution, listing, resolving names, moeflow.json metadata."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeflow.checkpoints.metadata import METADATA_FILENAME, read_metadata, write_metadata
from moeflow.checkpoints.store import (
    CachedModel,
    ModelNotCachedError,
    list_models,
    models_dir,
    resolve_home,
    resolve_model,
    safetensors_num_params,
)


def _cache_with_tiny_models(tiny_dirs: dict[str, Path], home: Path) -> None:
    for checkpoint_dir in tiny_dirs.values():
        shutil.copytree(checkpoint_dir, models_dir(home) / checkpoint_dir.name)


def test_resolve_home() -> None:
    assert resolve_home({"MOEFLOW_HOME": "/data/mf", "HOME": "/home/u"}) == Path("/data/mf")
    assert resolve_home({"MOEFLOW_HOME": "", "HOME": "/home/u"}) == Path("/home/u/.cache/moeflow")
    assert resolve_home({"HOME": "/home/u"}) == Path("/home/u/.cache/moeflow")
    assert resolve_home({}) == Path.home() / ".cache" / "moeflow"
    assert models_dir(Path("/data/mf")) == Path("/data/mf/models")


def test_list_models_empty_when_no_cache(tmp_path: Path) -> None:
    assert list_models(tmp_path / "nowhere") == []


def test_list_models(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    _cache_with_tiny_models(tiny_dirs, tmp_path)
    (models_dir(tmp_path) / ".tiny-llama.tmp-1-abc").mkdir()  # in-progress pull: hidden
    (models_dir(tmp_path) / "not-a-model").mkdir()  # no config.json: ignored
    models = list_models(tmp_path)
    assert [model.name for model in models] == [
        "tiny-llama",
        "tiny-mixtral",
        "tiny-qwen2-moe",
        "tiny-qwen3-moe",
    ]
    by_name = {model.name: model for model in models}
    llama = by_name["tiny-llama"]
    assert isinstance(llama, CachedModel)
    assert llama.architecture == "llama"
    assert llama.path == models_dir(tmp_path) / "tiny-llama"
    assert llama.size_bytes > (llama.path / "model.safetensors").stat().st_size
    assert by_name["tiny-qwen2-moe"].architecture == "qwen2_moe"
    assert by_name["tiny-mixtral"].num_params > by_name["tiny-qwen3-moe"].num_params


def test_num_params_from_headers_matches_metadata(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    for arch, checkpoint_dir in tiny_dirs.items():
        metadata = read_metadata(checkpoint_dir)
        assert metadata is not None, arch
        assert safetensors_num_params(checkpoint_dir) == metadata.num_params, arch
    copy = models_dir(tmp_path) / "no-metadata"
    shutil.copytree(tiny_dirs["llama"], copy)
    (copy / METADATA_FILENAME).unlink()
    [model] = list_models(tmp_path)
    assert model.num_params == safetensors_num_params(tiny_dirs["llama"])


def test_resolve_model(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    home = tmp_path / "home"
    _cache_with_tiny_models(tiny_dirs, home)
    assert resolve_model(str(tiny_dirs["mixtral"]), home) == tiny_dirs["mixtral"]
    assert resolve_model("tiny-qwen3-moe", home) == models_dir(home) / "tiny-qwen3-moe"


@pytest.mark.parametrize(("name", "hint"), [
    ("smollm2-135m-instruct", "run `moeflow models pull smollm2-135m-instruct`"),
    ("some-model", "pull one with `moeflow models pull org/name`"),
    ("does/not/exist", "no such folder: does/not/exist"),
    ("./missing", "no such folder: ./missing"),
    ("file:///no/such/dir", "no such folder: /no/such/dir"),
    ("store://absent", "model 'absent' is not cached"),
])
def test_resolve_model_missing_says_how_to_get_it(tmp_path: Path, name: str, hint: str) -> None:
    with pytest.raises(ModelNotCachedError) as excinfo:
        resolve_model(name, tmp_path)
    message = str(excinfo.value)
    assert hint in message
    assert "\n" not in message
    assert "pull does/" not in message and "pull ./" not in message  # never `pull <path>`
    assert isinstance(excinfo.value, FileNotFoundError)


def test_resolve_model_folder_without_config_and_schemes(
        tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelNotCachedError, match="not a Hugging Face checkpoint folder"):
        resolve_model(str(tmp_path), tmp_path)
    assert resolve_model(f"file://{tiny_dirs['llama']}", tmp_path) == tiny_dirs["llama"]
    home = tmp_path / "home"
    _cache_with_tiny_models(tiny_dirs, home)
    assert resolve_model("store://tiny-llama", home) == models_dir(home) / "tiny-llama"


def test_metadata_round_trip_and_malformed(tmp_path: Path) -> None:
    assert read_metadata(tmp_path) is None
    written = write_metadata(
        tmp_path, name="m", source="tiny:llama", architecture="llama", num_params=7
    )
    assert read_metadata(tmp_path) == written
    assert written.created_unix > 1_600_000_000
    (tmp_path / METADATA_FILENAME).write_text('{"name": "m"}')
    assert read_metadata(tmp_path) is None
    (tmp_path / METADATA_FILENAME).write_text("not json")
    assert read_metadata(tmp_path) is None
