"""Plain Hugging Face transformers baseline: a tiny OpenAI-style server over `model.generate`.

The naive floor (baseline B0 in docs/benchmarks.md): fp32 eager, one request at a time (a lock),
each request a plain `generate` call whose tokens are streamed through a `BaseStreamer` as SSE.
Only what the benchmark needs: POST /v1/completions (string or token-id prompt, max_tokens,
temperature, ignore_eos, stream, stream_options.include_usage), GET /v1/models, GET /health.
Runs in its own venv (benchmarks/baselines/install_hf.sh), never imported by the project: python
hf_server.py --model-dir DIR --served-model-name NAME --port P --num-threads N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class QueueStreamer(BaseStreamer):
    """Receives token ids from `generate` (first call: the prompt) and hands them to asyncio."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self.loop, self.queue, self.seen_prompt = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def build_app(model_dir: str, name: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = next(iter(eos_ids), 0)
    lock = asyncio.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "hf"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await request.json()
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = list(prompt)
        else:
            ids = tokenizer.encode(prompt if isinstance(prompt, str) else prompt[0])
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature") or 0.0)
        ignore_eos = bool(body.get("ignore_eos", False))
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def run() -> None:
            kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": pad_id,
                                      "do_sample": temperature > 0}
            if temperature > 0:
                kwargs["temperature"] = temperature
            if ignore_eos:
                kwargs["min_new_tokens"] = max_tokens
            try:
                with torch.inference_mode():
                    model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                   dtype=torch.long), streamer=QueueStreamer(loop, queue), **kwargs)
            except Exception as exc:  # surfaced to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, exc)
                loop.call_soon_threadsafe(queue.put_nowait, None)

        async def tokens() -> AsyncIterator[tuple[int, str]]:
            async with lock:  # one request at a time: what a plain generate service does
                threading.Thread(target=run, daemon=True).start()
                out: list[int] = []
                sent = ""
                while (token := await queue.get()) is not None:
                    if isinstance(token, Exception):
                        raise token
                    out.append(token)
                    text = tokenizer.decode(out, skip_special_tokens=True)
                    delta = "" if text.endswith("\ufffd") else text[len(sent):]
                    sent += delta
                    yield token, delta

        def chunk(text: str, finish: str | None, usage: Any = None) -> str:
            payload = {"id": rid, "object": "text_completion", "created": created, "model": name,
                       "choices": [{"index": 0, "text": text, "logprobs": None,
                                    "finish_reason": finish}]}
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        def finish_reason(out: list[int]) -> str:
            return "stop" if out and out[-1] in eos_ids and not ignore_eos else "length"

        if stream:
            async def events() -> AsyncIterator[str]:
                out: list[int] = []
                async for token, delta in tokens():
                    out.append(token)
                    done = len(out) >= max_tokens or (token in eos_ids and not ignore_eos)
                    yield chunk(delta, finish_reason(out) if done else None)
                if include_usage:
                    usage = {"prompt_tokens": len(ids), "completion_tokens": len(out),
                             "total_tokens": len(ids) + len(out)}
                    payload = {"id": rid, "object": "text_completion", "created": created,
                               "model": name, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        out_ids: list[int] = []
        text = ""
        async for token, delta in tokens():
            out_ids.append(token)
            text += delta
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out_ids),
                 "total_tokens": len(ids) + len(out_ids)}
        return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                             "model": name, "usage": usage,
                             "choices": [{"index": 0, "text": text, "logprobs": None,
                                          "finish_reason": finish_reason(out_ids)}]})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--served-model-name", default="model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    app = build_app(args.model_dir, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
