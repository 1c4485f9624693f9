"""lm-evaluation-harness's request shapes against `moeflow up`, colocated and PD (tiny llama,
float32), read back as lm-eval reads them, and checked against transformers on the same
checkpoint.

The shapes are those of EleutherAI/lm-evaluation-harness `lm_eval/models/openai_completions.py`
(`LocalCompletionsAPI._create_payload` / `parse_logprobs` / `parse_generations`, and
`LocalChatCompletion._create_payload`), sent as `lm_eval/models/api_models.py`
(`TemplateAPI.model_call`) sends them: one JSON POST per batch, token-id prompts (its default
`tokenized_requests=True`), seed 1234.

- loglikelihood (`local-completions`): `/v1/completions` with the batch's context+continuation
  token lists as `prompt`, `echo: true`, `logprobs: 1`, `max_tokens: 1`, `temperature: 0`;
  the log-likelihood is `sum(token_logprobs[ctxlen:-1])` and the continuation is greedy when
  each of those equals the largest value of its `top_logprobs` entry.
- generate_until (`local-completions`): token-list prompts, `max_tokens`, `temperature: 0`,
  `stop` (the task's `until` plus the EOS text), `seed`; (`local-chat-completions`):
  `messages`, the same fields, at most 4 stops.

lm-eval itself is not installed (it pulls in datasets, torch extras and more): these are its
payloads and its parsing, restated. lm-eval probes `/tokenizer_info` for a remote tokenizer;
without it (as here) it tokenizes with the checkpoint's Hugging Face tokenizer, whose ids are
the ones sent below.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from moeflow.text.tokenizer import TextTokenizer
from tests.platform_process import ALWAYS_SPLIT, Platform, start_platform
from tests.reference import hf_chat_ids, hf_greedy, hf_model

MODEL = "tiny"
SEED = 1234  # lm-eval's default seed, sent with every request
CONTEXT = [1, 15, 27, 99, 3, 64, 8, 200, 31]


@pytest.fixture(scope="module", params=["colocated", "pd"])
def served(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    mode = ["--mode", "pd", "--prefill", "1", "--decode", "1", "--transport", "shm",
            *ALWAYS_SPLIT] \
        if request.param == "pd" else []
    p = start_platform(tiny_dirs["llama"],
                       ["--served-model-name", MODEL, "--max-model-len", "256", *mode])
    yield p
    assert p.stop() == 0, p.log()[-3000:]


def post(platform: Platform, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{platform.base_url}{path}", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def parse_logprobs(out: dict[str, Any], ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's LocalCompletionsAPI.parse_logprobs, restated."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens,
                              strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(tok == max(top.values())
                        for tok, top in zip(token_logprobs, top_logprobs, strict=True))
        res.append((sum(token_logprobs), is_greedy))
    return res


def hf_loglikelihood(model_dir: Path, context: list[int],
                     continuation: list[int]) -> tuple[float, bool]:
    ids = context + continuation
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = range(len(context), len(ids))
    total = sum(float(logprobs[p - 1, ids[p]]) for p in positions)
    greedy = all(int(logprobs[p - 1].argmax()) == ids[p] for p in positions)
    return total, greedy


def test_loglikelihood_requests_equal_transformers(served: Platform,
                                                   tiny_dirs: dict[str, Path]) -> None:
    model_dir = tiny_dirs["llama"]
    greedy_continuation = hf_greedy(model_dir, CONTEXT, 4)
    requests = [(CONTEXT, greedy_continuation), (CONTEXT, [7, 300, 42]),
                (CONTEXT[:4], [5]), (CONTEXT[:6], greedy_continuation[:1])]
    payload = {"model": MODEL, "prompt": [c + x for c, x in requests], "temperature": 0,
               "max_tokens": 1, "logprobs": 1, "seed": SEED, "echo": True}
    got = parse_logprobs(post(served, "/completions", payload), [len(c) for c, _ in requests])
    expected = [hf_loglikelihood(model_dir, c, x) for c, x in requests]
    assert [g for _, g in got] == [g for _, g in expected]
    assert expected[0][1] and not expected[1][1], "the cases must cover greedy and not greedy"
    for (ll, _), (want, _), (_, continuation) in zip(got, expected, requests, strict=True):
        assert ll == pytest.approx(want, abs=1e-4 * len(continuation))


def test_generate_until_completions_and_chat(served: Platform,
                                             tiny_dirs: dict[str, Path]) -> None:
    model_dir = tiny_dirs["llama"]
    tok = TextTokenizer.from_dir(model_dir)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(model_dir).eos_token
    full = tok.decode(hf_greedy(model_dir, CONTEXT, 16))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), "the tiny model's output no longer suits this test"
    out = post(served, "/completions", {
        "prompt": [CONTEXT, CONTEXT[:5]], "model": MODEL, "max_tokens": 16, "temperature": 0,
        "stop": [stop, eos], "seed": SEED})
    texts = [c["text"] for c in sorted(out["choices"], key=itemgetter("index"))]
    assert texts[0] == full[:full.find(stop)]
    other = tok.decode(hf_greedy(model_dir, CONTEXT[:5], 16))
    assert texts[1] == (other[:other.find(stop)] if stop in other else other)

    messages = [{"role": "user", "content": "Question: where does the river go?"}]
    answer = tok.decode(hf_greedy(model_dir, hf_chat_ids(model_dir, messages), 16))
    chat_stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    out = post(served, "/chat/completions", {
        "messages": messages, "model": MODEL, "max_tokens": 16, "temperature": 0,
        "stop": [chat_stop, "\n\nQuestion:", eos][:4], "seed": SEED})
    assert out["choices"][0]["message"]["content"] == answer[:answer.find(chat_stop)]
