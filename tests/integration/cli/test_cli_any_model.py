"""Any model through the CLI: a local HF folder, hf://org/name and `models pull org/name`.

The Hub is a local HTTP server speaking its file protocol (tests/local_hub.py), reached through
HF_ENDPOINT exactly as huggingface_hub reaches the real one; never the internet. Engines are the
real `moeflow up` processes; answers are checked against transformers' own greedy generate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from moeflow.text.tokenizer import TextTokenizer
from tests.local_hub import LocalHub, serve_hub
from tests.platform_process import start_platform
from tests.reference import hf_chat_ids, hf_greedy

QUESTION = [{"role": "user", "content": "Tell me about the river and the town."}]
TOKEN = "hf_test_token_123"


@pytest.fixture()
def unsupported_dir(tiny_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """The tiny llama relabelled as an architecture the engine does not run."""
    folder = tmp_path / "gpt2-like"
    shutil.copytree(tiny_dirs["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture()
def hub(tiny_dirs: dict[str, Path], unsupported_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """The local Hub with tiny/llama and tiny/gpt2; HF_* and MOEFLOW_HOME point at tmp dirs,
    so every child process (inheriting os.environ) uses them."""
    with serve_hub({"tiny/llama": tiny_dirs["llama"], "tiny/gpt2": unsupported_dir}) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("MOEFLOW_HOME", str(tmp_path / "moeflow-home"))
        yield served


def _moeflow(*argv: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "moeflow.cli", *argv], capture_output=True,
                          text=True, timeout=timeout_s, env=dict(os.environ), check=False)


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_the_local_hub_speaks_the_protocol_huggingface_hub_uses(
        hub: LocalHub, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Contract test of the test server: huggingface_hub itself downloads from it."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    folder = Path(snapshot_download("tiny/llama", cache_dir=tmp_path / "c", endpoint=hub.url))
    source = tiny_dirs["llama"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in source.iterdir())
    _same_files(folder, source, [p.name for p in source.iterdir()])
    hf_hub_download("tiny/llama", "config.json", cache_dir=tmp_path / "d", endpoint=hub.url,
                    token="hf_other")
    assert ("HEAD", "/tiny/llama/resolve/main/config.json", "Bearer hf_other") in hub.requests
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tiny/none", "config.json", cache_dir=tmp_path / "e", endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("tiny/llama", "config.json", revision="v9", cache_dir=tmp_path / "f",
                        endpoint=hub.url)


def test_models_pull_org_name_writes_a_plain_folder(hub: LocalHub,
                                                    tiny_dirs: dict[str, Path]) -> None:
    done = _moeflow("models", "pull", "tiny/llama")
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert folder == Path(os.environ["MOEFLOW_HOME"]) / "models" / "llama"
    _same_files(folder, tiny_dirs["llama"], ["config.json", "model.safetensors",
                                             "tokenizer.json", "chat_template.jinja"])
    assert json.loads((folder / "moeflow.json").read_text())["source"] == "hf:tiny/llama"
    assert not (folder / ".cache").exists()
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)  # HF_TOKEN is sent
    listed = _moeflow("models", "list")
    assert "llama" in listed.stdout and "KiB" in listed.stdout

    again = _moeflow("models", "pull", "hf://tiny/llama")  # cached: no download, same folder
    assert again.returncode == 0 and Path(again.stdout.strip()) == folder


def test_unsupported_architectures_are_refused_before_the_weights(hub: LocalHub) -> None:
    done = _moeflow("models", "pull", "tiny/gpt2")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "architecture gpt2 is not supported" in lines[-1]
    assert "supported: llama, mistral, mixtral, qwen2" in lines[-1]
    assert "Traceback" not in done.stderr
    assert not any(path.endswith("model.safetensors") and "gpt2" in path
                   for _, path, _ in hub.requests)
    up = _moeflow("up", "--model", "hf://tiny/gpt2", timeout_s=60)
    assert up.returncode == 1 and "is not supported" in up.stderr.strip().splitlines()[-1]


def test_up_serves_a_local_folder_a_hub_model_and_a_pulled_one_like_transformers(
        hub: LocalHub, tiny_dirs: dict[str, Path]) -> None:
    model_dir = tiny_dirs["llama"]
    prompt_ids = hf_chat_ids(model_dir, QUESTION)
    expected = TextTokenizer.from_dir(model_dir).decode(hf_greedy(model_dir, prompt_ids, 8))
    pulled = _moeflow("models", "pull", "tiny/llama", "--name", "pulled-llama")
    assert pulled.returncode == 0, pulled.stderr
    for model, served in ((str(model_dir), model_dir.name), ("hf://tiny/llama@main", "llama"),
                          ("pulled-llama", "pulled-llama")):  # `models pull` of a repo id
        platform = start_platform(model)
        try:
            client = openai.OpenAI(base_url=platform.base_url, api_key="x", max_retries=0)
            assert [m.id for m in client.models.list()] == [served]
            answer = client.chat.completions.create(
                model=served, messages=QUESTION, max_tokens=8, temperature=0,  # type: ignore[arg-type]
            )
            assert answer.choices[0].message.content == expected, model
        finally:
            platform.stop()
    snapshots = Path(os.environ["HF_HOME"]) / "hub" / "models--tiny--llama" / "snapshots"
    assert snapshots.is_dir()  # served from the HF cache, the one transformers and vLLM share
