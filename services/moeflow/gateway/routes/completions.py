"""POST /v1/completions: one engine task per prompt and choice (``n``); choice ``i * n + j``
is prompt ``i``'s ``j``-th. ``echo`` puts the prompt before each choice's text (with
``logprobs``, the prompt tokens' log-likelihoods first: what evaluation harnesses read).

A prompt given as text is raw text: special-token text in it (``<|im_start|>``) is encoded as
ordinary characters, never as control tokens; a client that wants control tokens sends token
ids (a list of ints, or a list of such lists).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse

from moeflow.domain.errors import InvalidRequestError, MoeflowError
from moeflow.domain.messages import TokenChunk
from moeflow.gateway.choices import choice_samplings, open_choices
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.generation import until_disconnected
from moeflow.gateway.logprobs import completion_logprobs
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    Usage,
    make_usage,
    now_unix,
    sse_responses,
)
from moeflow.gateway.registry import ServedModel
from moeflow.gateway.streaming import (
    SSE_DONE,
    Collected,
    collect_choice,
    event_stream,
    merge,
    sse_event,
)
from moeflow.text.tokenizer import TextTokenizer
from moeflow.web.errors import sse_error

router = APIRouter()


def _prompts(body: CompletionRequest, model: ServedModel, max_prompts: int) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        prompts = [model.tokenizer.encode_prompt(p)]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [model.tokenizer.encode_prompt(x) for x in p]  # type: ignore[arg-type]
    elif p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]  # type: ignore[arg-type]
    else:
        raise InvalidRequestError("prompt must be a non-empty string or list", param="prompt")
    if len(prompts) > max_prompts:
        raise InvalidRequestError(f"at most {max_prompts} prompts per request", param="prompt")
    if any(not ids for ids in prompts):
        raise InvalidRequestError("prompts must not be empty", param="prompt")
    vocab = model.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for ids in prompts for t in ids):
        raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return prompts


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses=sse_responses(Completion, CompletionChunk),
)
async def create_completion(
    body: CompletionRequest, request: Request, service: ServiceDep
) -> Completion | EventSourceResponse:
    model = service.registry.get(body.model)
    record = request_record(request.scope)
    record.model = model.name
    refused = body.unsupported()
    if refused is not None:
        raise InvalidRequestError(refused[1], param=refused[0])
    prompts = _prompts(body, model, service.settings.max_prompts_per_request)
    k = body.num_logprobs()
    samplings = [
        service.sampling_params(
            body, num_prompt_tokens=len(ids), model=model, max_tokens=body.max_tokens or 16
        )
        for ids in prompts
    ]
    if body.echo and k is not None:
        samplings = [s.model_copy(update={"prompt_logprobs": k}) for s in samplings]
    n = body.n
    tokenizer = model.tokenizer
    echoes = _echo_texts(body, prompts, tokenizer) if body.echo else None
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = now_unix()

    async def start() -> list[AsyncGenerator[TokenChunk, None]]:
        streams: list[AsyncGenerator[TokenChunk, None]] = []
        try:
            for i, (ids, sampling) in enumerate(zip(prompts, samplings, strict=True)):
                # choice index = prompt index * n + choice of that prompt, as OpenAI numbers them
                streams += await open_choices(
                    service, model, "completions", request_id, ids,
                    choice_samplings(sampling, n), request.is_disconnected,
                    index_offset=i * n if len(prompts) > 1 else 0)
        except BaseException as exc:
            if isinstance(exc, MoeflowError):
                record.failed(exc)  # a stream woken from zero reports it only as an SSE event
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    # a stream at zero instances starts now and sends keep-alives while the model wakes
    ticket = service.wake.hold(model.name) if body.stream and service.wake else None
    opened = await start() if ticket is None else None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # without include_usage OpenAI leaves "usage" out; with it, null until the end
        exclude = None if include_usage else {"usage"}

        def chunk_of(choices: list[CompletionChoice]) -> CompletionChunk:
            return CompletionChunk(id=request_id, created=created, model=model.public_name,
                                   choices=choices)

        async def events(streams: list[AsyncGenerator[TokenChunk, None]]) -> AsyncIterator[str]:
            finals: dict[int, TokenChunk] = {}
            offsets: dict[int, int] = {}
            try:
                async for index, chunk in merge(streams):
                    if chunk.finish_reason is not None:
                        finals[index] = chunk
                    text = chunk.text
                    logprobs = None
                    entries = list(chunk.logprobs)
                    if echoes is not None and index not in offsets:
                        offsets[index] = 0
                        echo = echoes[index // n]
                        entries = list(chunk.prompt_logprobs) + entries
                        if k is not None:
                            logprobs = completion_logprobs(tokenizer, chunk.prompt_logprobs)
                            offsets[index] = len(echo)
                        text = echo + text
                    if k is not None:
                        start_at = offsets.get(index, 0)
                        out = completion_logprobs(tokenizer, chunk.logprobs, start_at)
                        if logprobs is not None:  # echo: the prompt's entries come first
                            for name in ("tokens", "token_logprobs", "top_logprobs",
                                         "text_offset"):
                                getattr(logprobs, name).extend(getattr(out, name))
                        else:
                            logprobs = out
                        offsets[index] = start_at + len(chunk.text)
                    if not text and chunk.finish_reason is None and not entries:
                        continue
                    choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                              finish_reason=chunk.finish_reason)
                    yield sse_event(chunk_of([choice]), exclude=exclude)
            except MoeflowError as exc:
                record.failed(exc)
                yield sse_error(exc)
                yield SSE_DONE
                return
            if include_usage:
                yield sse_event(CompletionChunk(id=request_id, created=created,
                                                model=model.public_name, choices=[],
                                                usage=_usage(finals, n)))
            yield SSE_DONE

        if ticket is not None and service.wake is not None:
            return event_stream(service.wake.sse_after_wake(
                ticket, service.settings.keep_alive_interval_s, start, events
            ))
        assert opened is not None
        return event_stream(events(opened))

    async def gather_all() -> list[Collected]:
        assert opened is not None
        return list(await asyncio.gather(*(collect_choice(s) for s in opened)))

    results = await until_disconnected(request.is_disconnected, gather_all())
    choices = []
    for i, r in enumerate(results):
        text = r.text
        logprobs = None
        if k is not None:
            logprobs = completion_logprobs(tokenizer, r.logprobs)
        if echoes is not None:
            echo = echoes[i // n]
            text = echo + text
            if k is not None:
                logprobs = completion_logprobs(tokenizer, r.prompt_logprobs)
                rest = completion_logprobs(tokenizer, r.logprobs, len(echo))
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(logprobs, name).extend(getattr(rest, name))
        choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs,
                                        finish_reason=r.last.finish_reason))
    return Completion(
        id=request_id,
        created=created,
        model=model.public_name,
        choices=choices,
        usage=_usage({i: r.last for i, r in enumerate(results)}, n),
    )


def _echo_texts(body: CompletionRequest, prompts: list[list[int]],
                tokenizer: TextTokenizer) -> list[str]:
    """Each prompt as ``echo`` returns it: the text sent, or token ids decoded."""
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, str) for x in p):
        return [str(x) for x in p]
    return [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]


def _usage(finals: dict[int, TokenChunk], n: int) -> Usage:
    """Each prompt counted once (its n choices share it), every choice's output counted."""
    firsts = [c for i, c in finals.items() if i % n == 0]
    return make_usage(
        sum(c.num_prompt_tokens for c in firsts),
        sum(c.num_output_tokens for c in finals.values()),
        sum(c.num_cached_tokens for c in firsts),
    )
