"""`moeflow models upcycle` / `upcycle()`: the weights, config and files it writes, on a small
synthetic Llama checkpoint (no transformers needed). The math (upcycled greedy == dense greedy
through transformers and the engine) is in tests/integration/engine/test_upcycled_moe.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeflow.checkpoints.cli import register
from moeflow.checkpoints.metadata import read_metadata, write_metadata
from moeflow.checkpoints.store import safetensors_num_params
from moeflow.checkpoints.upcycle import UpcycleError, UpcycleSpec, upcycle

HIDDEN, INTER, LAYERS, VOCAB = 16, 24, 2, 40
TOKENIZER_FILES = {"tokenizer.json": '{"fake": 1}', "chat_template.jinja": "{{ messages }}",
                   "generation_config.json": '{"eos_token_id": 2}'}


def write_dense(model_dir: Path, *, tied: bool = True, **config: object) -> Path:
    """A Llama-shaped checkpoint: 2 layers, 4 heads x 4 dims (2 KV heads), random weights."""
    torch.manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (HIDDEN,),
                   f"{p}.post_attention_layernorm.weight": (HIDDEN,),
                   f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                   f"{p}.self_attn.k_proj.weight": (8, HIDDEN),
                   f"{p}.self_attn.v_proj.weight": (8, HIDDEN),
                   f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN),
                   f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
                   f"{p}.mlp.down_proj.weight": (HIDDEN, INTER)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    model_dir.mkdir(parents=True)
    save_file({k: torch.randn(s) for k, s in shapes.items()}, str(model_dir / "model.safetensors"))
    raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
           "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 4, "vocab_size": VOCAB, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied,
           "initializer_range": 0.02, "rope_parameters": {"rope_type": "default",
                                                          "rope_theta": 10000.0}} | config
    (model_dir / "config.json").write_text(json.dumps(raw))
    for name, text in TOKENIZER_FILES.items():
        (model_dir / name).write_text(text)
    write_metadata(model_dir, name="dense", source="tiny:llama", architecture="llama",
                   num_params=safetensors_num_params(model_dir))
    return model_dir


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out |= {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return out


@pytest.fixture
def dense(tmp_path: Path) -> Path:
    return write_dense(tmp_path / "dense")


def test_experts_copy_the_mlp_and_everything_else_is_unchanged(dense: Path, tmp_path: Path) -> None:
    out = upcycle(dense, tmp_path / "moe", UpcycleSpec(num_experts=4, top_k=2))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["norm_topk_prob"] is True and config["tie_word_embeddings"] is True
    assert config["intermediate_size"] == INTER and "attention_bias" not in config
    # Llama defaults the source omits are written out, since Mixtral's defaults differ
    assert (config["rms_norm_eps"], config["max_position_embeddings"]) == (1e-6, 2048)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    src, moe = tensors(dense), tensors(out)
    for key, tensor in src.items():
        if ".mlp." not in key:
            assert torch.equal(moe[key], tensor), key
    for i in range(LAYERS):
        p = f"model.layers.{i}.block_sparse_moe"
        assert moe[f"{p}.gate.weight"].shape == (4, HIDDEN)
        assert 0.005 < moe[f"{p}.gate.weight"].std().item() < 0.05  # initializer_range 0.02
        for e in range(4):
            for name, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                assert torch.equal(moe[f"{p}.experts.{e}.{name}.weight"],
                                   src[f"model.layers.{i}.mlp.{proj}.weight"])
    assert not any(".mlp." in key for key in moe) and "lm_head.weight" not in moe
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    meta = read_metadata(out)
    assert meta is not None and meta.source == "upcycle:dense" and meta.name == "moe"
    assert meta.architecture == "mixtral" and meta.num_params == safetensors_num_params(out)
    assert not list(tmp_path.glob(".moe.tmp-*")), "the temp dir is renamed away"


def test_seeded_noise_and_router_are_reproducible(dense: Path, tmp_path: Path) -> None:
    spec = UpcycleSpec(num_experts=3, top_k=1, perturb_std=0.01, seed=5)
    a = tensors(upcycle(dense, tmp_path / "a", spec))
    b = tensors(upcycle(dense, tmp_path / "b", spec))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = tensors(upcycle(dense, tmp_path / "c", UpcycleSpec(num_experts=3, top_k=1, seed=5)))
    router = "model.layers.1.block_sparse_moe.gate.weight"
    assert torch.equal(a[router], c[router]), "the router does not depend on the noise"
    d = tensors(upcycle(dense, tmp_path / "d", UpcycleSpec(num_experts=3, top_k=1, seed=6)))
    assert not torch.equal(a[router], d[router])
    dense_w = tensors(dense)["model.layers.0.mlp.up_proj.weight"]
    experts = [a[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"] for e in range(3)]
    for expert in experts:
        assert (expert - dense_w).std().item() == pytest.approx(0.01, rel=0.2)
    assert not torch.equal(experts[0], experts[1]), "each expert has its own noise"
    zero = tensors(upcycle(dense, tmp_path / "z", UpcycleSpec(num_experts=2, router_std=0.0)))
    assert not zero["model.layers.0.block_sparse_moe.gate.weight"].any()


def test_mistral_source_keeps_its_sliding_window(tmp_path: Path) -> None:
    source = write_dense(tmp_path / "mistral", model_type="mistral")
    out = upcycle(source, tmp_path / "moe", UpcycleSpec())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["sliding_window"] == 4096
    explicit = write_dense(tmp_path / "mistral-none", model_type="mistral", sliding_window=None)
    out = upcycle(explicit, tmp_path / "moe2", UpcycleSpec())
    assert json.loads((out / "config.json").read_text())["sliding_window"] is None


def test_untied_lm_head_and_shards(tmp_path: Path) -> None:
    untied = write_dense(tmp_path / "untied", tied=False)
    out = upcycle(untied, tmp_path / "moe", UpcycleSpec(num_experts=2), max_shard_bytes=8_000)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    moe = tensors(out)
    assert set(index["weight_map"]) == set(moe) and "lm_head.weight" in moe
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in moe.values())
    with safe_open(str(out / shards[0]), framework="pt") as handle:
        recipe = json.loads(handle.metadata()["moeflow.upcycle"])
    assert recipe["num_experts"] == 2 and recipe["source"] == "dense"


@pytest.mark.parametrize(
    ("spec", "config", "message"),
    [
        (UpcycleSpec(num_experts=2, top_k=3), {}, "--top-k"),
        (UpcycleSpec(num_experts=0), {}, "--experts"),
        (UpcycleSpec(perturb_std=-1.0), {}, "--perturb"),
        (UpcycleSpec(), {"model_type": "qwen2"}, "cannot upcycle model_type 'qwen2'"),
        (UpcycleSpec(), {"attention_bias": True}, "biases"),
        (UpcycleSpec(), {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_refusals(tmp_path: Path, spec: UpcycleSpec, config: dict[str, object],
                  message: str) -> None:
    source = write_dense(tmp_path / "src", **config)
    with pytest.raises(UpcycleError, match=message):
        upcycle(source, tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()


def test_refuses_a_taken_output_dir(dense: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UpcycleError, match="already exists"):
        upcycle(dense, tmp_path / "taken", UpcycleSpec())
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert upcycle(dense, tmp_path / "empty", UpcycleSpec()) == tmp_path / "empty"


def _run(home: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="moeflow")
    register(parser.add_subparsers(dest="command", required=True), lambda: home)
    args = parser.parse_args(list(argv))
    exit_code: int = args.func(args)
    return exit_code


def test_cli_upcycles_a_cached_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dense(tmp_path / "models" / "dense")
    assert _run(tmp_path, "models", "upcycle", "dense", "--experts", "4", "--perturb", "0.001") == 0
    captured = capsys.readouterr()
    out_dir = tmp_path / "models" / "dense-moe4x2"
    assert captured.out.strip() == str(out_dir)
    assert "upcycling dense: 4 experts, top-2" in captured.err
    assert json.loads((out_dir / "config.json").read_text())["num_local_experts"] == 4

    other = tmp_path / "elsewhere"
    assert _run(tmp_path, "models", "upcycle", str(tmp_path / "models" / "dense"), "--top-k",
                "1", "--out", str(other), "--name", "my-moe") == 0
    assert capsys.readouterr().out.strip() == str(other)
    meta = read_metadata(other)
    assert meta is not None and meta.name == "my-moe"

    assert _run(tmp_path, "models", "upcycle", "dense", "--experts", "4") == 1
    assert "already exists" in capsys.readouterr().err
    assert _run(tmp_path, "models", "upcycle", "nope") == 1
    assert "model 'nope' is not cached under" in capsys.readouterr().err
