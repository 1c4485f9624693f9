"""Where a LoRA adapter's requests go, and how a `model` names an adapter (plain data)."""

from __future__ import annotations

import pytest

from moeflow.domain.errors import ModelNotFoundError
from moeflow.domain.messages import ModelInfo
from moeflow.domain.roles import Role
from moeflow.gateway.engine_client import EngineClient
from moeflow.gateway.registry import ModelRegistry, ServedModel
from moeflow.gateway.routing import InstanceView, adapter_instances, place, prefix_keys
from moeflow.text.tokenizer import TextTokenizer


def _view(url: str, role: str = "colocated", *, knows: str = "", holds: str = "",
          load: int = 0, healthy: bool = True) -> InstanceView:
    return InstanceView(url=url, role=Role(role), rank_name=url, is_healthy=healthy,
                        num_running=load,
                        adapters=frozenset(knows.split()),
                        resident_adapters=frozenset(holds.split()))


def test_base_requests_go_anywhere() -> None:
    instances = [_view("x", knows="a", holds="a"), _view("y")]
    assert adapter_instances(instances, None) == instances


def test_instances_holding_the_adapter_are_preferred_even_when_busier() -> None:
    holder = _view("x", knows="a", holds="a", load=5)
    knower = _view("y", knows="a", load=0)
    stranger = _view("z", load=0)
    chosen = adapter_instances([holder, knower, stranger], "a")
    assert chosen == [holder]
    placement = place(chosen, num_prompt_tokens=4, max_tokens=4,
                      min_prompt_tokens_for_split=100, prefix_blocks={})
    assert placement is not None and placement.colocated is holder


def test_without_a_healthy_holder_those_that_know_it_serve() -> None:
    sick_holder = _view("x", knows="a", holds="a", healthy=False)
    knower = _view("y", knows="a")
    assert adapter_instances([sick_holder, knower, _view("z")], "a") == [sick_holder, knower]
    assert adapter_instances([_view("z")], "a") == []


def test_each_role_of_a_split_is_narrowed_on_its_own() -> None:
    prefill = _view("p", "prefill", knows="a", holds="a")
    decode_knows = _view("d1", "decode", knows="a")
    decode_none = _view("d2", "decode")
    chosen = adapter_instances([prefill, decode_knows, decode_none], "a")
    assert chosen == [prefill, decode_knows]
    placement = place(chosen, num_prompt_tokens=4, max_tokens=4,
                      min_prompt_tokens_for_split=1, prefix_blocks={})
    assert placement is not None and placement.decode is decode_knows


def test_prefix_keys_of_adapters_never_match_the_base_or_each_other() -> None:
    tokens = list(range(64))
    base, a, b = (prefix_keys(tokens, adapter=x) for x in (None, "a", "b"))
    assert len(base) == len(a) == len(b) == 4
    assert not set(base) & set(a) and not set(a) & set(b)
    assert prefix_keys(tokens, adapter="a") == a


def test_a_model_names_an_adapter_by_base_colon_name_or_its_own_name() -> None:
    registry = ModelRegistry(EngineClient(connect_timeout_s=1, request_timeout_s=1))
    info = ModelInfo(served_model_name="tiny", architecture="llama", max_model_len=64,
                     tokenizer_json="{}", chat_template=None, bos_token=None, eos_token=None,
                     eos_token_ids=(), created_unix=0)
    tokenizer = TextTokenizer.__new__(TextTokenizer)  # not used by name resolution
    registry.models["tiny"] = ServedModel(info=info, tokenizer=tokenizer,
                                          instances=[_view("x", knows="a")])
    assert registry.get("tiny").adapter is None
    for name in ("tiny:a", "a"):
        model = registry.get(name)
        assert (model.adapter, model.name, model.public_name) == ("a", "tiny", "a")
        assert model.instances is registry.models["tiny"].instances
    for name in ("b", "tiny:b", "other:a"):
        with pytest.raises(ModelNotFoundError):
            registry.get(name)
