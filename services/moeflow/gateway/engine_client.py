"""HTTP client for engine instances: the gateway side of the ``moeflow.domain.messages`` wire.

Errors an instance reports become the same domain errors here; an instance that cannot be
reached, or that drops a stream, becomes ``BackendUnavailableError``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from moeflow.domain.errors import BackendUnavailableError, MoeflowError, error_from_code
from moeflow.domain.messages import EngineStats, GenerateRequest, ModelInfo, TokenChunk


class EngineUnreachableError(BackendUnavailableError):
    """Connecting to the instance failed: nothing was sent, so another instance may retry."""


def _error_from_response(status_code: int, body: bytes) -> MoeflowError:
    try:
        error = json.loads(body)["error"]
        return error_from_code(str(error["code"]), str(error["message"]), error.get("param"))
    except (ValueError, KeyError, TypeError):
        return BackendUnavailableError(f"engine instance answered HTTP {status_code}")


class EngineClient:
    def __init__(self, *, connect_timeout_s: float, request_timeout_s: float) -> None:
        timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def model_info(self, url: str) -> ModelInfo:
        response = await self._http.get(f"{url}/v1/model_info")
        response.raise_for_status()
        return ModelInfo.model_validate_json(response.content)

    async def stats(self, url: str) -> EngineStats:
        response = await self._http.get(f"{url}/v1/stats", timeout=5.0)
        response.raise_for_status()
        return EngineStats.model_validate_json(response.content)

    async def open_generate(self, url: str, request: GenerateRequest) -> EngineStream:
        """Send the request and wait for the instance to accept it (errors raise here)."""
        http_request = self._http.build_request(
            "POST", f"{url}/v1/generate", content=request.model_dump_json(),
            headers={"content-type": "application/json"},
        )
        try:
            response = await self._http.send(http_request, stream=True)
        except httpx.ConnectError as exc:
            raise EngineUnreachableError(f"engine instance {url} is unreachable") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(
                f"engine instance {url} failed: {type(exc).__name__}"
            ) from exc
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise _error_from_response(response.status_code, body)
        return EngineStream(url, response)


class EngineStream:
    """Chunks of one accepted request; ``aclose`` (or leaving early) aborts it upstream."""

    def __init__(self, url: str, response: httpx.Response) -> None:
        self._url = url
        self._response = response

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        try:
            async for line in self._response.aiter_lines():
                if not line:
                    continue
                data = json.loads(line)
                if "code" in data and "token_ids" not in data:
                    raise error_from_code(str(data["code"]), str(data["message"]))
                chunk = TokenChunk.model_validate(data)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(
                f"engine instance {self._url} failed mid-request: {type(exc).__name__}"
            ) from exc
        finally:
            await self._response.aclose()
        raise BackendUnavailableError(f"engine instance {self._url} ended the stream early")
