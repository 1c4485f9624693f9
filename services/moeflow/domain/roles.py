"""Serving modes and engine roles: the one definition every plane uses.

A role says what one engine instance computes; a mode says which roles a Model runs. The CLI's
choices, the CRD's enums, the engine's settings and the gateway's routing all read these.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Mode(StrEnum):
    COLOCATED = "colocated"
    PD_DISAGGREGATED = "pd-disaggregated"
    ATTENTION_EXPERT_DISAGGREGATED = "attention-expert-disaggregated"


class Role(StrEnum):
    COLOCATED = "colocated"
    PREFILL = "prefill"
    DECODE = "decode"
    ATTENTION = "attention"
    EXPERT = "expert"

    @property
    def takes_requests(self) -> bool:
        """Whether the gateway sends requests here; expert instances only answer attention
        instances over XCCL."""
        return self is not Role.EXPERT

    @property
    def runs_whole_model(self) -> bool:
        """Whether the instance holds every layer's weights (so it can warm up on a prompt and
        be forked); attention and expert instances hold one side each."""
        return self in (Role.COLOCATED, Role.PREFILL, Role.DECODE)

    @property
    def routes_as(self) -> Role:
        """The role the gateway's placement treats it as: an attention instance takes whole
        requests exactly like a colocated one."""
        return Role.COLOCATED if self is Role.ATTENTION else self


# The job roles of each serving mode, in the order their Jobs are planned.
ROLES_BY_MODE: Mapping[Mode, tuple[Role, ...]] = {
    Mode.COLOCATED: (Role.COLOCATED,),
    Mode.PD_DISAGGREGATED: (Role.PREFILL, Role.DECODE),
    Mode.ATTENTION_EXPERT_DISAGGREGATED: (Role.ATTENTION, Role.EXPERT),
}

# `moeflow up --mode` takes short names; the CRD the long ones.
MODE_SHORT_NAMES: Mapping[str, Mode] = {
    "colocated": Mode.COLOCATED,
    "pd": Mode.PD_DISAGGREGATED,
    "ae": Mode.ATTENTION_EXPERT_DISAGGREGATED,
}
