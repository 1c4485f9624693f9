"""Streamed tool calls: a choice's output text, as it arrives, becomes OpenAI's deltas.

OpenAI streams a call as a first ``delta.tool_calls`` entry with its ``index``, ``id``,
``type`` and ``function.name`` (``arguments`` empty), then entries with the same ``index`` and
only ``function.arguments`` fragments; clients (the ``openai`` stream helpers, LangChain)
concatenate the fragments. This module produces that from the model's text:

- a constrained choice ("required" or a named function) writes ``{"name": ..., "arguments":
  ...}``, or an array of them with ``parallel_tool_calls``: each call is announced as soon as
  its name is complete and its arguments go out as they are written;
- an "auto" choice writes content, with ``<tool_call>{json}</tool_call>`` blocks where it
  calls: the content goes out as content (held back only while it could still be the start of
  a tag), each block as a call, as above.

A call is announced when its name is known, before its arguments are complete: if
``max_tokens`` cuts it, the client has a partial call and ``finish_reason`` "length", as from
OpenAI. The non-streamed answer (``tools.parse_calls``) reads the same text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from moeflow.gateway.protocol import DeltaToolCall, DeltaToolCallFunction
from moeflow.gateway.tools import ToolPlan

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class _Call:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    sent_upto: int | None = None
    """How much of the arguments' text went out (an offset into the scanner's text)."""
    announced: bool = False


@dataclass
class _CallScanner:
    """Follows JSON text that is one call object (``call_depth`` 1) or an array of call
    objects (``call_depth`` 2), character by character, without parsing ahead."""

    call_depth: int
    text: str = ""
    stack: list[str] = field(default_factory=list)
    in_string: bool = False
    escaped: bool = False
    string_start: int = 0
    key: str | None = None
    expecting_key: bool = False
    calls: list[_Call] = field(default_factory=list)
    started: bool = False

    @property
    def closed(self) -> bool:
        """The top-level value is complete (what follows it is not read)."""
        return self.started and not self.stack

    def feed(self, piece: str) -> None:
        start = len(self.text)
        self.text += piece
        for i in range(start, len(self.text)):
            if self.closed:
                return
            self._step(i, self.text[i])

    def _step(self, i: int, c: str) -> None:
        depth = len(self.stack)
        call = self.calls[-1] if self.calls else None
        at_call = depth == self.call_depth and call is not None
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
                if at_call and call is not None:
                    self._string_done(call, self.text[self.string_start:i + 1])
            return
        if at_call and call is not None and not self.expecting_key and self.key == "arguments" \
                and call.args_start is None and not c.isspace():
            call.args_start = i
        if c == '"':
            self.in_string, self.string_start = True, i
        elif c in "{[":
            if depth == self.call_depth - 1 and c == "{":
                self.calls.append(_Call())
                self.key, self.expecting_key = None, True
            self.stack.append(c)
            self.started = True
        elif c in "}]":
            if at_call and call is not None:
                self._value_done(call, i)
            if self.stack:
                self.stack.pop()
        elif at_call and call is not None and c == ":":
            self.expecting_key = False
        elif at_call and call is not None and c == ",":
            self._value_done(call, i)
            self.expecting_key = True

    def _string_done(self, call: _Call, raw: str) -> None:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return
        if self.expecting_key:
            self.key = str(value)
        elif self.key == "name" and call.name is None:
            call.name = str(value)

    def _value_done(self, call: _Call, i: int) -> None:
        if not self.expecting_key and self.key == "arguments" and call.args_start is not None \
                and call.args_end is None:
            call.args_end = i

    def args_now(self, call: _Call) -> tuple[int, int] | None:
        """The span of the call's arguments written so far."""
        if call.args_start is None:
            return None
        return call.args_start, call.args_end if call.args_end is not None else len(self.text)


class ToolCallStream:
    """One choice's streamed output: feed its text pieces, get content and call deltas."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._scanners: list[_CallScanner] = []
        self._held = ""  # text not yet sent: a possible tag start, or the inside of a block
        self._blanks = ""
        self._sent_content = False
        self._in_block = False
        self._ids: list[str] = []
        if plan.is_constrained:
            self._scanners.append(_CallScanner(2 if plan.parallel else 1))

    @property
    def num_calls(self) -> int:
        return len(self._ids)

    def feed(self, piece: str) -> tuple[str, list[DeltaToolCall]]:
        """The content and the call deltas that ``piece`` (the next output text) adds."""
        if self._plan.is_constrained:
            self._scanners[0].feed(piece)
            return "", self._call_deltas()
        content: list[str] = []
        calls: list[DeltaToolCall] = []
        self._held += piece
        while self._held:
            if self._in_block:
                end = self._held.find(_CLOSE)
                body = self._held if end < 0 else self._held[:end]
                keep = _partial_suffix(body, _CLOSE) if end < 0 else 0
                self._scanners[-1].feed(body[:len(body) - keep])
                calls += self._call_deltas()
                if end < 0:
                    self._held = body[len(body) - keep:]
                    break
                self._held = self._held[end + len(_CLOSE):]
                self._in_block = False
                continue
            start = self._held.find(_OPEN)
            if start >= 0:
                content.append(self._content(self._held[:start]))
                self._held = self._held[start + len(_OPEN):]
                self._in_block = True
                self._scanners.append(_CallScanner(1))
                continue
            keep = _partial_suffix(self._held, _OPEN)  # what could still open a block
            content.append(self._content(self._held[:len(self._held) - keep]))
            self._held = self._held[len(self._held) - keep:]
            break
        return "".join(content), calls

    def finish(self) -> str:
        """The content still held when the output ends."""
        held, self._held = self._held, ""
        return "" if self._in_block else self._content(held)

    def _content(self, text: str) -> str:
        """What of ``text`` can go out as content: the whole answer's content is stripped, so
        blanks at its start are dropped and blanks wait until more content follows them."""
        text = self._blanks + text
        if not self._sent_content:
            text = text.lstrip()
        body = text.rstrip()
        self._blanks = text[len(body):]
        self._sent_content = self._sent_content or bool(body)
        return body

    def _call_deltas(self) -> list[DeltaToolCall]:
        out: list[DeltaToolCall] = []
        for scanner in self._scanners:
            for call in scanner.calls:
                if call.name is None:
                    continue
                if not call.announced:
                    if self._ids and not self._plan.parallel:
                        continue  # one call only: later ones are dropped, as in parse_calls
                    call.announced = True
                    self._ids.append(f"call_{uuid.uuid4().hex[:24]}")
                    out.append(DeltaToolCall(
                        index=len(self._ids) - 1, id=self._ids[-1], type="function",
                        function=DeltaToolCallFunction(name=call.name, arguments="")))
                    call_index = len(self._ids) - 1
                else:
                    call_index = self._index_of(call)
                span = scanner.args_now(call)
                if span is None:
                    continue
                begin = call.sent_upto if call.sent_upto is not None else span[0]
                if span[1] > begin:
                    out.append(DeltaToolCall(index=call_index, function=DeltaToolCallFunction(
                        arguments=scanner.text[begin:span[1]])))
                    call.sent_upto = span[1]
        return out

    def _index_of(self, call: _Call) -> int:
        announced = [c for s in self._scanners for c in s.calls if c.announced]
        return next(i for i, c in enumerate(announced) if c is call)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
