"""Contract of the OpenAI shape (openai_shape.py) between the batch fan-out and a gateway:
the fake gateway obeys it, the operator's requests obey it, and the operator reads it.
`check_gateway` is the same check to run against the real gateway (see its docstring)."""

from __future__ import annotations

import jsonschema
import pytest
from fake_gateway import FakeGateway, respond
from openai_shape import SHAPES, check, check_gateway

from moeflow.controller.batch import HttpCompletionClient, extract_text, parse_prompts
from moeflow.domain.spec import CompletionApi

PATHS = {CompletionApi.COMPLETIONS: "/v1/completions",
         CompletionApi.CHAT_COMPLETIONS: "/v1/chat/completions"}


async def test_the_fake_gateway_passes_the_contract() -> None:
    async with FakeGateway() as gateway:
        await check_gateway(gateway.url, "smollm2-135m-instruct")
        assert [path for path, _ in gateway.received] == list(SHAPES)


@pytest.mark.parametrize("api", list(CompletionApi))
def test_operator_bodies_and_parsing_match_the_shape(api: CompletionApi) -> None:
    jsonl = '"plain"\n{"id": 7, "max_tokens": 3, "stop": ["\\n"], ' + (
        '"prompt": "x"}' if api is CompletionApi.COMPLETIONS else
        '"messages": [{"role": "user", "content": "x"}]}')
    items, invalid = parse_prompts(jsonl, api=api, model="m", max_tokens=16, temperature=0.5)
    assert invalid == [] and len(items) == 2
    request_shape, response_shape = SHAPES[PATHS[api]]
    for item in items:
        check(request_shape, item.body)
        response = respond(PATHS[api], item.body, "hello")
        check(response_shape, response)
        assert extract_text(api, response) == "hello"


async def test_the_operator_client_talks_to_the_fake() -> None:
    async with FakeGateway() as gateway:
        client = HttpCompletionClient(timeout_s=5)
        try:
            body = {"model": "m", "prompt": "hi", "max_tokens": 2}
            response = await client.post_json(gateway.url + "/v1/completions", body)
            assert extract_text(CompletionApi.COMPLETIONS, response) == "echo: hi"
            with pytest.raises(RuntimeError, match="HTTP 400"):
                await client.post_json(gateway.url + "/v1/completions", {"model": "m"})
        finally:
            await client.aclose()


def test_the_shape_refuses_what_the_operator_could_not_read() -> None:
    _, response_shape = SHAPES["/v1/completions"]
    with pytest.raises(jsonschema.ValidationError):
        check(response_shape, {"id": "x", "object": "text_completion", "created": 1,
                               "model": "m", "choices": []})
