"""LoRA adapters through the whole platform (`moeflow up --lora`), with the official openai
client: base and two adapters at once, each token for token equal to transformers + PEFT
(unmerged), colocated and prefill/decode split; adapters listed in /v1/models with their
parent; loaded and unloaded at run time through the engine API (internal token required);
an unknown adapter is a 404 ``model_not_found`` in the OpenAI envelope."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from moeflow.text.tokenizer import TextTokenizer
from tests.lora_kit import ATTENTION, make_adapter, peft_greedy, two_adapters
from tests.platform_process import ALWAYS_SPLIT, Platform, start_platform
from tests.reference import hf_greedy

MODEL = "tiny"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Path]:
    return two_adapters(tiny_dirs["llama"], tmp_path_factory.mktemp("adapters"))


def _lora_args(adapters: dict[str, Path]) -> list[str]:
    return [arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]


@pytest.fixture(scope="module")
def lora_platform(tiny_dirs: dict[str, Path], adapters: dict[str, Path]) -> Iterator[Platform]:
    p = start_platform(tiny_dirs["llama"], ["--served-model-name", MODEL, "--max-model-len",
                                            "256", *_lora_args(adapters)])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def _listed(platform: Platform) -> dict[str, str | None]:
    data = httpx.get(f"{platform.base_url}/models", timeout=5).json()["data"]
    return {m["id"]: m.get("parent") for m in data}


def _wait_listed(platform: Platform, expected: dict[str, str | None]) -> None:
    """The gateway learns an instance's adapters from its stats (polled every second)."""
    deadline = time.monotonic() + 15
    while _listed(platform) != expected:
        assert time.monotonic() < deadline, _listed(platform)
        time.sleep(0.2)


def _engine_url(platform: Platform, role: str) -> str:
    out = subprocess.run(["pgrep", "-a", "-P", str(platform.process.pid), "-f", f"role {role}"],
                         capture_output=True, text=True, check=False).stdout.split()
    return f"http://127.0.0.1:{out[out.index('--port') + 1]}"


def _prompts(model_dir: Path) -> list[list[int]]:
    tokenizer = TextTokenizer.from_dir(model_dir)
    texts = ["Once upon a time there was a baker by the river, and every morning ",
             "The capital of France is", "one two three four five six seven eight nine ten"]
    return [tokenizer.encode(t) for t in texts]


async def _serve_all(platform: Platform, jobs: list[tuple[list[int], str]]) -> list[str]:
    """Every job at once (the engine batches them), greedy; the texts and response models."""
    client = openai.AsyncOpenAI(base_url=platform.base_url, api_key="x", max_retries=0)
    try:
        results = await asyncio.gather(*(
            client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0)
            for prompt, model in jobs))
    finally:
        await client.close()
    for result, (_, model) in zip(results, jobs, strict=True):
        assert result.model == model.removeprefix(f"{MODEL}:")
    return [r.choices[0].text for r in results]


def _expected(model_dir: Path, adapters: dict[str, Path], prompt: list[int], model: str
              ) -> str:
    adapter = model.removeprefix(f"{MODEL}:")
    tokens = (hf_greedy(model_dir, prompt, MAX_TOKENS) if adapter == MODEL
              else peft_greedy(model_dir, adapters[adapter], prompt, MAX_TOKENS))
    return TextTokenizer.from_dir(model_dir).decode(tokens)


async def _check_base_and_adapters(platform: Platform, model_dir: Path,
                                   adapters: dict[str, Path]) -> None:
    _wait_listed(platform, {MODEL: None, "a": MODEL, "b": MODEL})
    jobs = [(p, m) for p in _prompts(model_dir) for m in (MODEL, f"{MODEL}:a", "b")]
    texts = await _serve_all(platform, jobs)
    for (prompt, model), text in zip(jobs, texts, strict=True):
        assert text == _expected(model_dir, adapters, prompt, model), model
    assert len(set(texts[:3])) == 3  # base, a and b do answer differently


async def test_base_and_two_adapters_at_once_equal_peft(
    lora_platform: Platform, tiny_dirs: dict[str, Path], adapters: dict[str, Path]
) -> None:
    await _check_base_and_adapters(lora_platform, tiny_dirs["llama"], adapters)


async def test_unknown_adapter_is_a_404_in_the_envelope(lora_platform: Platform) -> None:
    client = openai.AsyncOpenAI(base_url=lora_platform.base_url, api_key="x", max_retries=0)
    for name in ("nope", f"{MODEL}:nope"):
        with pytest.raises(openai.NotFoundError) as info:
            await client.completions.create(model=name, prompt="hi", max_tokens=2)
        assert info.value.code == "model_not_found"
        assert isinstance(info.value.body, dict) and info.value.body["param"] == "model"
    await client.close()


async def test_adapters_load_and_unload_at_run_time(
    lora_platform: Platform, tiny_dirs: dict[str, Path], adapters: dict[str, Path],
    tmp_path: Path
) -> None:
    model_dir = tiny_dirs["llama"]
    c = make_adapter(model_dir, tmp_path / "c", seed=7, targets=ATTENTION)
    engine = _engine_url(lora_platform, "colocated")
    headers = lora_platform.engine_headers()
    body = {"name": "c", "path": str(c)}
    async with httpx.AsyncClient(timeout=30) as http:
        refused = await http.post(f"{engine}/v1/adapters/load", json=body)
        assert refused.status_code == 401  # the internal token guards it, as every route
        bad = await http.post(f"{engine}/v1/adapters/load", headers=headers,
                              json={"name": "d", "path": str(tmp_path)})
        assert bad.status_code == 400
        assert "adapter_config.json" in bad.json()["error"]["message"]
        loaded = await http.post(f"{engine}/v1/adapters/load", headers=headers, json=body)
        assert loaded.status_code == 200, loaded.text
        _wait_listed(lora_platform, {MODEL: None, "a": MODEL, "b": MODEL, "c": MODEL})
        prompt = _prompts(model_dir)[0]
        [text] = await _serve_all(lora_platform, [(prompt, "c")])
        expected = TextTokenizer.from_dir(model_dir).decode(
            peft_greedy(model_dir, c, prompt, MAX_TOKENS))
        assert text == expected
        unloaded = await http.post(f"{engine}/v1/adapters/unload", headers=headers,
                                   json={"name": "c"})
        assert unloaded.status_code == 200, unloaded.text
        again = await http.post(f"{engine}/v1/adapters/unload", headers=headers,
                                json={"name": "c"})
        assert again.status_code == 404
        assert again.json()["error"]["code"] == "model_not_found"
    _wait_listed(lora_platform, {MODEL: None, "a": MODEL, "b": MODEL})
    client = openai.AsyncOpenAI(base_url=lora_platform.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="c", prompt=prompt, max_tokens=2)
    await client.close()


def test_pd_split_applies_the_adapter_on_both_sides(
    tiny_dirs: dict[str, Path], adapters: dict[str, Path]
) -> None:
    p = start_platform(tiny_dirs["llama"], ["--served-model-name", MODEL, "--mode", "pd",
                                            "--prefill", "1", "--decode", "1", *ALWAYS_SPLIT,
                                            "--max-model-len", "256", *_lora_args(adapters)])
    try:
        asyncio.run(_check_base_and_adapters(p, tiny_dirs["llama"], adapters))
        assert (p.metric("moeflow_requests_by_mode_total", mode="split") or 0) >= 9
    finally:
        assert p.stop() == 0, p.log()[-3000:]


async def test_adapter_requests_go_to_the_instance_that_has_it(
    tiny_dirs: dict[str, Path], adapters: dict[str, Path]
) -> None:
    """Two instances, the adapter loaded on one at run time: every request for it lands there
    (the other would answer 404), base requests still use both."""
    model_dir = tiny_dirs["llama"]
    p = start_platform(model_dir, ["--served-model-name", MODEL, "--instances", "2",
                                   "--max-model-len", "256"])
    try:
        out = subprocess.run(["pgrep", "-a", "-P", str(p.process.pid), "-f", "role colocated"],
                             capture_output=True, text=True, check=False).stdout.splitlines()
        urls = sorted(f"http://127.0.0.1:{line.split()[line.split().index('--port') + 1]}"
                      for line in out)
        assert len(urls) == 2
        async with httpx.AsyncClient(timeout=30) as http:
            loaded = await http.post(f"{urls[0]}/v1/adapters/load", headers=p.engine_headers(),
                                     json={"name": "a", "path": str(adapters["a"])})
            assert loaded.status_code == 200, loaded.text
        _wait_listed(p, {MODEL: None, "a": MODEL})
        prompt = _prompts(model_dir)[1]
        texts = await _serve_all(p, [(prompt, "a")] * 6 + [(prompt, MODEL)] * 6)
        assert set(texts[:6]) == {_expected(model_dir, adapters, prompt, "a")}
        assert set(texts[6:]) == {_expected(model_dir, adapters, prompt, MODEL)}
    finally:
        assert p.stop() == 0, p.log()[-3000:]
