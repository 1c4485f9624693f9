"""GenerationService.sampling_params: OpenAI fields -> SamplingParams, refusing what we lack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from moeflow.domain.errors import ContextLengthExceededError, InvalidRequestError
from moeflow.domain.messages import ModelInfo, SamplingParams
from moeflow.gateway.generation import GenerationService
from moeflow.gateway.protocol import ChatCompletionRequest, CompletionRequest
from moeflow.gateway.registry import ServedModel
from moeflow.gateway.settings import GatewaySettings
from moeflow.text.tokenizer import TextTokenizer

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def model(tiny_dirs: dict[str, Path]) -> ServedModel:
    tokenizer = TextTokenizer.from_dir(tiny_dirs["llama"])
    info = ModelInfo(
        served_model_name="tiny",
        architecture="llama",
        max_model_len=MAX_MODEL_LEN,
        tokenizer_json=tokenizer.tokenizer_json,
        chat_template=tokenizer.chat_template,
        bos_token=None,
        eos_token="<|im_end|>",
        eos_token_ids=(2,),
        created_unix=0,
    )
    return ServedModel(info=info, tokenizer=tokenizer)


@pytest.fixture
def service() -> GenerationService:
    settings = GatewaySettings(max_stop_sequences=4)
    return GenerationService(settings, None, None, None)  # type: ignore[arg-type]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], **fields
    )


def params(
    service: GenerationService,
    model: ServedModel,
    body: ChatCompletionRequest | CompletionRequest,
    *,
    num_prompt_tokens: int = 10,
) -> SamplingParams:
    return service.sampling_params(
        body, num_prompt_tokens=num_prompt_tokens, model=model, max_tokens=body.max_tokens
    )


def refused_param(
    service: GenerationService, model: ServedModel, body: ChatCompletionRequest, **kw: Any
) -> str | None:
    with pytest.raises(InvalidRequestError) as info:
        params(service, model, body, **kw)
    assert info.value.status_code == 400
    return info.value.param


# -- defaults -------------------------------------------------------------------------------------


def test_defaults_sample_at_temperature_one_up_to_the_room_left_in_context(
    service: GenerationService, model: ServedModel
) -> None:
    p = params(service, model, chat(), num_prompt_tokens=10)
    assert p == SamplingParams(
        max_tokens=MAX_MODEL_LEN - 10,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        seed=None,
        stop=(),
        stop_token_ids=(),
        ignore_eos=False,
    )


def test_explicit_fields_are_carried_over(service: GenerationService, model: ServedModel) -> None:
    body = chat(
        max_tokens=7,
        temperature=0.0,
        top_p=0.5,
        top_k=20,
        seed=42,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 5],
        ignore_eos=True,
    )
    p = params(service, model, body)
    assert p.max_tokens == 7
    assert p.temperature == 0.0
    assert p.is_greedy
    assert p.top_p == 0.5
    assert p.top_k == 20
    assert p.seed == 42
    assert p.stop == ("\n\n", "END")
    assert p.stop_token_ids == (2, 5)
    assert p.ignore_eos


def test_a_single_stop_string_becomes_a_one_element_tuple(
    service: GenerationService, model: ServedModel
) -> None:
    assert params(service, model, chat(stop="###")).stop == ("###",)


def test_top_k_minus_one_means_disabled(service: GenerationService, model: ServedModel) -> None:
    assert params(service, model, chat(top_k=-1)).top_k == 0


def test_zero_penalties_and_false_logprobs_are_accepted(
    service: GenerationService, model: ServedModel
) -> None:
    body = chat(presence_penalty=0.0, frequency_penalty=0.0, logprobs=False, n=1)
    assert params(service, model, body).max_tokens == MAX_MODEL_LEN - 10


def test_completion_requests_use_the_same_rules(
    service: GenerationService, model: ServedModel
) -> None:
    body = CompletionRequest(model="tiny", prompt="Hi", max_tokens=3, stop="x")
    p = params(service, model, body)
    assert (p.max_tokens, p.stop) == (3, ("x",))


# -- refusals -------------------------------------------------------------------------------------


def test_penalties_bias_min_tokens_and_logprobs_are_carried_over(
    service: GenerationService, model: ServedModel
) -> None:
    p = params(service, model, chat(presence_penalty=0.5, frequency_penalty=-1.0,
                                    repetition_penalty=1.2, min_tokens=2, max_tokens=5,
                                    logit_bias={"3": -100, "4": 2.5}, logprobs=True,
                                    top_logprobs=3))
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.0, 1.2)
    assert (p.min_tokens, p.logit_bias, p.logprobs) == (2, ((3, -100.0), (4, 2.5)), 3)
    assert params(service, model, chat(logprobs=False)).logprobs is None
    completion = CompletionRequest(model="tiny", prompt="Hi", max_tokens=3, logprobs=2)
    assert params(service, model, completion).logprobs == 2


@pytest.mark.parametrize(("fields", "param"), [
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"word": 1}}, "logit_bias"),
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_sampling_extras_are_refused_by_name(
    service: GenerationService, model: ServedModel, fields: dict[str, Any], param: str
) -> None:
    assert refused_param(service, model, chat(**fields)) == param


def test_too_many_stop_sequences_are_refused(
    service: GenerationService, model: ServedModel
) -> None:
    assert params(service, model, chat(stop=["a", "b", "c", "d"])).stop == ("a", "b", "c", "d")
    assert refused_param(service, model, chat(stop=["a", "b", "c", "d", "e"])) == "stop"


@pytest.mark.parametrize("stop", ["", ["ok", ""]])
def test_empty_stop_sequences_are_refused(
    service: GenerationService, model: ServedModel, stop: str | list[str]
) -> None:
    assert refused_param(service, model, chat(stop=stop)) == "stop"


@pytest.mark.parametrize("token_id", [-1, 512, 10_000])
def test_stop_token_ids_outside_the_vocabulary_are_refused(
    service: GenerationService, model: ServedModel, token_id: int
) -> None:
    assert model.tokenizer.vocab_size == 512
    assert refused_param(service, model, chat(stop_token_ids=[3, token_id])) == "stop_token_ids"


# -- context length -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prompt_tokens", [MAX_MODEL_LEN, MAX_MODEL_LEN + 1, 10_000])
def test_a_prompt_filling_the_context_is_refused(
    service: GenerationService, model: ServedModel, num_prompt_tokens: int
) -> None:
    with pytest.raises(ContextLengthExceededError, match=str(MAX_MODEL_LEN)) as info:
        params(service, model, chat(), num_prompt_tokens=num_prompt_tokens)
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"


def test_max_tokens_beyond_the_room_left_is_refused(
    service: GenerationService, model: ServedModel
) -> None:
    room = MAX_MODEL_LEN - 10
    assert params(service, model, chat(max_tokens=room), num_prompt_tokens=10).max_tokens == room
    with pytest.raises(ContextLengthExceededError) as info:
        params(service, model, chat(max_tokens=room + 1), num_prompt_tokens=10)
    assert info.value.param == "max_tokens"


def test_a_prompt_one_token_short_of_the_context_leaves_room_for_one(
    service: GenerationService, model: ServedModel
) -> None:
    p = params(service, model, chat(), num_prompt_tokens=MAX_MODEL_LEN - 1)
    assert p.max_tokens == 1


def test_max_tokens_argument_overrides_the_body(
    service: GenerationService, model: ServedModel
) -> None:
    # The chat route passes max_completion_tokens (preferred) or max_tokens explicitly.
    body = chat(max_tokens=5, max_completion_tokens=9)
    p = service.sampling_params(body, num_prompt_tokens=10, model=model, max_tokens=9)
    assert p.max_tokens == 9


# -- the seed reaches torch.Generator.manual_seed in the engine ------------------------------------


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_torch_cannot_use_is_refused_as_a_bad_request(seed: int) -> None:
    """An out-of-range seed must be a 400 on ``seed``, not a crash of the engine loop."""
    with pytest.raises(ValidationError) as info:
        chat(seed=seed, temperature=1.0)
    assert info.value.errors()[0]["loc"] == ("seed",)
