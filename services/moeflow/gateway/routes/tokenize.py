"""POST /tokenize and /detokenize, with vLLM's request and response shapes.

The ids are exactly what the generation endpoints compute from the same input: a ``prompt``
is encoded as /v1/completions encodes text, ``messages`` as /v1/chat/completions renders and
encodes them. Nothing reaches an engine instance; the gateway holds each model's tokenizer.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from moeflow.domain.errors import InvalidRequestError
from moeflow.gateway.deps import ServiceDep
from moeflow.gateway.middleware import request_record
from moeflow.gateway.protocol import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request,
                   service: ServiceDep) -> TokenizeResponse:
    model = service.registry.get(body.model)
    request_record(request.scope).model = model.name
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
    if body.add_special_tokens:
        raise InvalidRequestError(
            "add_special_tokens=true is not supported: text is encoded as /v1/completions "
            "encodes it (no special tokens added)", param="add_special_tokens")
    if body.messages is not None:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = model.tokenizer.encode_chat(messages,
                                          add_generation_prompt=body.add_generation_prompt)
    else:
        assert body.prompt is not None
        ids = model.tokenizer.encode_prompt(body.prompt)
    return TokenizeResponse(count=len(ids), max_model_len=model.info.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request,
                     service: ServiceDep) -> DetokenizeResponse:
    model = service.registry.get(body.model)
    request_record(request.scope).model = model.name
    vocab = model.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise InvalidRequestError(f"token ids must lie in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=model.tokenizer.decode(body.tokens,
                                                            skip_special_tokens=False))
