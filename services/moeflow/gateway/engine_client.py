"""HTTP client for engine instances: the gateway side of the ``moeflow.domain.messages`` wire.

Errors an instance reports become the same domain errors here. Failures of the instance itself
(cannot be reached, dropped or cut the stream, answered garbage) become ``InstanceFailedError``,
which names the instance for the gateway's own use (marking it unhealthy, failing over) and
carries a message without internal addresses for the client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

import httpx

from moeflow.domain.errors import BackendUnavailableError, MoeflowError, error_from_code
from moeflow.domain.messages import EngineStats, GenerateRequest, ModelInfo, TokenChunk
from moeflow.web.framing import FrameTooLargeError, read_lines


class InstanceFailedError(BackendUnavailableError):
    """The instance at ``url`` failed (``reason``: unreachable, cut, error). ``is_before_accept``:
    nothing was accepted, so the request can go elsewhere as it is. ``detail`` is for logs."""

    def __init__(self, url: str, reason: str, detail: str, *, is_before_accept: bool) -> None:
        super().__init__("an engine instance serving this request failed")
        self.url = url
        self.reason = reason
        self.detail = detail
        self.is_before_accept = is_before_accept


def _error_from_response(url: str, status_code: int, body: bytes) -> MoeflowError:
    try:
        error = json.loads(body)["error"]
        return error_from_code(str(error["code"]), str(error["message"]), error.get("param"))
    except (ValueError, KeyError, TypeError):
        return InstanceFailedError(url, "error", f"HTTP {status_code} without an envelope",
                                   is_before_accept=True)


class EngineClient:
    def __init__(self, *, connect_timeout_s: float, request_timeout_s: float,
                 headers: Mapping[str, str] | None = None) -> None:
        """``headers`` go with every call (the internal token that engines require)."""
        timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, headers=dict(headers or {}))

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
            raise InstanceFailedError(url, "unreachable", repr(exc),
                                      is_before_accept=True) from exc
        except httpx.TransportError as exc:  # the connection broke: the instance is gone
            raise InstanceFailedError(url, "cut", f"{type(exc).__name__}: {exc}",
                                      is_before_accept=False) from exc
        except httpx.HTTPError as exc:
            raise InstanceFailedError(url, "error", f"{type(exc).__name__}: {exc}",
                                      is_before_accept=False) from exc
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise _error_from_response(url, response.status_code, body)
        return EngineStream(url, response)


class EngineStream:
    """Chunks of one accepted request; ``aclose`` (or leaving early) aborts it upstream.

    Ends after the chunk with ``finish_reason``. An ``ErrorChunk`` raises its domain error; a
    stream that breaks, ends early or carries garbage raises ``InstanceFailedError``.
    """

    def __init__(self, url: str, response: httpx.Response) -> None:
        self.url = url
        self._response = response

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        try:
            async for line in read_lines(self._response.aiter_bytes()):
                data = json.loads(line)
                if "code" in data and "token_ids" not in data:
                    raise error_from_code(str(data["code"]), str(data["message"]))
                chunk = TokenChunk.model_validate(data)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        except httpx.HTTPError as exc:
            raise InstanceFailedError(self.url, "cut", f"{type(exc).__name__}: {exc}",
                                      is_before_accept=False) from exc
        except (ValueError, FrameTooLargeError) as exc:  # JSON or schema: a broken peer
            raise InstanceFailedError(self.url, "error", f"bad stream: {exc}",
                                      is_before_accept=False) from exc
        finally:
            await self._response.aclose()
        raise InstanceFailedError(self.url, "cut", "stream ended before finish_reason",
                                  is_before_accept=False)
