"""TextTokenizer (chat templates like transformers) and IncrementalDetokenizer (deltas, stops)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer

from moeflow.domain.errors import InvalidRequestError
from moeflow.text.tokenizer import IncrementalDetokenizer, TextTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello! How are you?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The river runs past the old mill."},
        {"role": "user", "content": "And a city?\n\tTabs and  spaces too."},
    ],
    [{"role": "user", "content": ""}],
]


def hf_render(model_dir: Path, messages: list[dict[str, str]], **kwargs: object) -> str:
    hf = AutoTokenizer.from_pretrained(model_dir)
    return str(
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    )


def hf_ids(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    hf = AutoTokenizer.from_pretrained(model_dir)
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(i) for i in ids]


@pytest.fixture(scope="module")
def tiny_tok_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def tiny_tok(tiny_tok_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(tiny_tok_dir)


@pytest.fixture
def template_dir(tiny_tok_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny tokenizer files whose chat_template.jinja a test may rewrite."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_tok_dir / name, tmp_path / name)
    return tmp_path


def byte_level_tokenizer() -> TextTokenizer:
    """One token per byte (no merges): every non-ASCII character spans several tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return TextTokenizer(tok.to_str(), chat_template=None, bos_token=None, eos_token=None)


def stream(detok: IncrementalDetokenizer, token_ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids in random-sized groups; return every delta, finish() last."""
    deltas = []
    i = 0
    while i < len(token_ids):
        n = rng.randint(1, 3)
        deltas.append(detok.append(token_ids[i : i + n]))
        i += n
    deltas.append(detok.finish())
    return deltas


# -- chat templates -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral", "qwen2_moe"])
def test_render_chat_equals_transformers_apply_chat_template(
    tiny_dirs: dict[str, Path], arch: str
) -> None:
    tok = TextTokenizer.from_dir(tiny_dirs[arch])
    for messages in CONVERSATIONS:
        assert tok.render_chat(messages) == hf_render(tiny_dirs[arch], messages)


def test_encoded_render_equals_transformers_token_ids(tiny_tok_dir: Path) -> None:
    tok = TextTokenizer.from_dir(tiny_tok_dir)
    for messages in CONVERSATIONS:
        assert tok.encode(tok.render_chat(messages)) == hf_ids(tiny_tok_dir, messages)


def test_render_without_generation_prompt_matches_transformers(tiny_tok_dir: Path) -> None:
    tok = TextTokenizer.from_dir(tiny_tok_dir)
    messages = CONVERSATIONS[2]
    hf = AutoTokenizer.from_pretrained(tiny_tok_dir)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert tok.render_chat(messages, add_generation_prompt=False) == expected
    assert not tok.render_chat(messages, add_generation_prompt=False).endswith("assistant\n")


def test_encode_adds_no_special_tokens_and_spelled_specials_are_single_ids(
    tiny_tok: TextTokenizer,
) -> None:
    assert tiny_tok.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1
    assert all(t > 2 for t in tiny_tok.encode("Hi there"))  # no bos, nothing prepended
    assert tiny_tok.token_to_id("<|im_end|>") == 2
    assert tiny_tok.token_to_id("definitely not a token") is None
    assert tiny_tok.decode([1, *tiny_tok.encode("Hi"), 2]) == "Hi"
    assert tiny_tok.decode([1, 2], skip_special_tokens=False) == "<|im_start|><|im_end|>"


TEMPLATE_FEATURES = {
    # transformers passes tools=None / documents=None: "is not none" tests see None, not Undefined
    # (Mistral-7B-Instruct-v0.3's template renders [AVAILABLE_TOOLS] on exactly this test)
    "tools_is_none": (
        "{% for m in messages %}{% if tools is not none %}[TOOLS]{% endif %}"
        "{% if documents is not none %}[DOCS]{% endif %}{{ m['content'] }}\n{% endfor %}"
    ),
    # jinja2.ext.loopcontrols is enabled in transformers
    "loop_break": (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    ),
    # transformers' tojson keeps non-ASCII and <>& as is and keeps key order
    "tojson": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}",
    # Llama 3.x templates print today's date when strftime_now exists (else "26 Jul 2024")
    "strftime_now": (
        "{% if strftime_now is defined %}{{ strftime_now('%Y') }}{% else %}2024{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ),
}


@pytest.mark.parametrize("feature", list(TEMPLATE_FEATURES))
def test_render_chat_matches_transformers_on_template_features_real_models_use(
    template_dir: Path, feature: str
) -> None:
    (template_dir / "chat_template.jinja").write_text(TEMPLATE_FEATURES[feature])
    messages = [
        {"role": "system", "content": "Be <brief> & kind, café"},
        {"role": "user", "content": "Hi"},
    ]
    assert TextTokenizer.from_dir(template_dir).render_chat(messages) == hf_render(
        template_dir, messages
    )


def test_trim_and_lstrip_blocks_match_transformers(template_dir: Path) -> None:
    (template_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "U: {{ m['content'] }}\n"
        "    {% else %}\n"
        "O: {{ m['content'] }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    messages = CONVERSATIONS[2]
    assert TextTokenizer.from_dir(template_dir).render_chat(messages) == hf_render(
        template_dir, messages
    )


def test_chat_template_from_tokenizer_config_and_bos_eos_tokens(template_dir: Path) -> None:
    (template_dir / "chat_template.jinja").unlink()
    config = json.loads((template_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    config["bos_token"] = {"content": "<|im_start|>", "special": True}
    config["eos_token"] = "<|im_end|>"
    (template_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TextTokenizer.from_dir(template_dir)
    assert tok.bos_token == "<|im_start|>"
    assert tok.eos_token == "<|im_end|>"
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == "<|im_start|>Hi<|im_end|>"


def test_raise_exception_in_a_template_is_an_invalid_request(template_dir: Path) -> None:
    (template_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}"
    )
    tok = TextTokenizer.from_dir(template_dir)
    with pytest.raises(InvalidRequestError, match="System role not supported") as info:
        tok.render_chat(CONVERSATIONS[1])
    assert info.value.param == "messages"
    assert info.value.status_code == 400
    assert tok.render_chat(CONVERSATIONS[0]) == ""


def test_a_template_runtime_error_is_an_invalid_request(template_dir: Path) -> None:
    (template_dir / "chat_template.jinja").write_text(
        "{{ messages[0]['content'] | int(0) + undefined_thing.x }}"
    )
    tok = TextTokenizer.from_dir(template_dir)
    with pytest.raises(InvalidRequestError) as info:
        tok.render_chat(CONVERSATIONS[0])
    assert info.value.param == "messages"


def test_the_template_sandbox_refuses_unsafe_attribute_access(template_dir: Path) -> None:
    (template_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    tok = TextTokenizer.from_dir(template_dir)
    with pytest.raises(InvalidRequestError):
        tok.render_chat(CONVERSATIONS[0])


def test_a_model_without_chat_template_refuses_chat(tiny_tok: TextTokenizer) -> None:
    tok = TextTokenizer(tiny_tok.tokenizer_json, chat_template=None, bos_token=None, eos_token=None)
    with pytest.raises(InvalidRequestError, match="no chat template") as info:
        tok.render_chat(CONVERSATIONS[0])
    assert info.value.param == "messages"


# -- incremental detokenization -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_incremental_deltas_concatenate_to_the_full_decode_for_random_streams(
    tiny_tok: TextTokenizer, seed: int
) -> None:
    rng = random.Random(seed)
    ids = [rng.randrange(tiny_tok.vocab_size) for _ in range(rng.randint(1, 60))]
    detok = IncrementalDetokenizer(tiny_tok)
    deltas = stream(detok, ids, rng)
    assert "".join(deltas) == tiny_tok.decode(ids)  # special tokens (0, 1, 2) skipped
    assert detok.text == tiny_tok.decode(ids)
    assert not detok.is_stopped


def test_special_tokens_produce_no_text(tiny_tok: TextTokenizer) -> None:
    detok = IncrementalDetokenizer(tiny_tok)
    assert detok.append([1, 2, 0]) == ""
    hi = tiny_tok.encode("Hi there")
    assert "".join(detok.append([t]) for t in hi) + detok.finish() == "Hi there"


MULTIBYTE_TEXTS = [
    "café",
    "naïve résumé",
    "日本語のテキスト",
    "I 💙 emoji 👩‍👩‍👧!",
    "€",
    "a\u0301b",
]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_characters_split_across_tokens_never_leak_replacement_chars(text: str) -> None:
    tok = byte_level_tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # really one token per byte
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.append([t]) for t in ids] + [detok.finish()]
    # each code point is emitted whole, by the token carrying its last byte
    expected = []
    for char in text:
        expected += [""] * (len(char.encode("utf-8")) - 1) + [char]
    assert deltas == [*expected, ""]


@pytest.mark.parametrize("seed", range(10))
def test_random_valid_utf8_streams_detokenize_exactly(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab é€😀日\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
    tok = byte_level_tokenizer()
    deltas = stream(IncrementalDetokenizer(tok), tok.encode(text), rng)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("seed", range(10))
def test_random_byte_streams_lose_at_most_an_unfinished_trailing_character(seed: int) -> None:
    """Invalid bytes in the middle decode to U+FFFD like a full decode does; only an incomplete
    character at the very end is held back (it never completes)."""
    rng = random.Random(seed)
    tok = byte_level_tokenizer()
    ids = [rng.randrange(256) for _ in range(rng.randint(1, 30))]
    out = "".join(stream(IncrementalDetokenizer(tok), ids, rng))
    full = tok.decode(ids)
    if full.endswith("\ufffd"):
        assert full.startswith(out)
    else:
        assert out == full


# -- stop strings ---------------------------------------------------------------------------------


def ids_for(tok: TextTokenizer, *pieces: str) -> list[int]:
    """Token ids whose decoded pieces are exactly ``pieces`` (one encode per piece)."""
    ids = []
    for piece in pieces:
        ids.extend(tok.encode(piece))
    return ids


def test_a_stop_string_cuts_the_text_before_it(tiny_tok: TextTokenizer) -> None:
    detok = IncrementalDetokenizer(tiny_tok, stop=("STOP",))
    text = ""
    for token_id in ids_for(tiny_tok, "Hello world STOP and more"):
        text += detok.append([token_id])
    text += detok.finish()
    assert text == "Hello world "
    assert detok.is_stopped
    assert detok.append(tiny_tok.encode(" later")) == ""
    assert detok.finish() == ""


def test_a_stop_string_split_across_tokens_is_found(tiny_tok: TextTokenizer) -> None:
    ids = ids_for(tiny_tok, "The ", "r", "iv", "er", " runs")
    detok = IncrementalDetokenizer(tiny_tok, stop=("river",))
    deltas = [detok.append([t]) for t in ids]
    assert "".join(deltas) == "The "
    assert detok.is_stopped
    assert not any("r" in d for d in deltas)  # no prefix of the stop string leaked early


def test_text_that_might_start_a_stop_string_is_held_back_then_flushed_by_finish(
    tiny_tok: TextTokenizer,
) -> None:
    detok = IncrementalDetokenizer(tiny_tok, stop=("<END>",))
    emitted = ""
    for token_id in ids_for(tiny_tok, "abc", "<", "EN"):
        emitted += detok.append([token_id])
    assert not detok.is_stopped
    assert "abc<EN".startswith(emitted)
    assert len(emitted) <= len("abc<EN") - (len("<END>") - 1)
    assert emitted + detok.finish() == "abc<EN"
    assert detok.finish() == ""  # nothing is emitted twice


def test_held_back_text_is_released_once_it_cannot_start_a_stop(tiny_tok: TextTokenizer) -> None:
    detok = IncrementalDetokenizer(tiny_tok, stop=("xyz",))
    out = "".join(detok.append([t]) for t in tiny_tok.encode("hello there friend"))
    assert out == "hello there frie"  # all but len("xyz") - 1 characters
    assert detok.finish() == "nd"


def test_the_earliest_of_several_stop_strings_wins(tiny_tok: TextTokenizer) -> None:
    detok = IncrementalDetokenizer(tiny_tok, stop=("world", "lo"))
    text = detok.append(tiny_tok.encode("Hello world")) + detok.finish()
    assert text == "Hel"
    assert detok.is_stopped


def test_a_stop_string_inside_one_token_group_is_cut(tiny_tok: TextTokenizer) -> None:
    detok = IncrementalDetokenizer(tiny_tok, stop=("\n",))
    assert detok.append(tiny_tok.encode("one line\nsecond")) == "one line"
    assert detok.is_stopped


@pytest.mark.parametrize("seed", range(10))
def test_stop_strings_give_the_text_up_to_the_first_stop_for_random_streams(
    tiny_tok: TextTokenizer, seed: int
) -> None:
    rng = random.Random(seed)
    ids = [rng.randrange(3, tiny_tok.vocab_size) for _ in range(40)]
    full = tiny_tok.decode(ids)
    start = rng.randrange(len(full) - 4)
    stop = full[start : start + rng.randint(1, 4)]
    detok = IncrementalDetokenizer(tiny_tok, stop=(stop, "§never§"))
    out = "".join(stream(detok, ids, rng))
    assert out == full[: full.index(stop)]
    assert detok.is_stopped


def test_stop_strings_with_multibyte_characters() -> None:
    tok = byte_level_tokenizer()
    detok = IncrementalDetokenizer(tok, stop=("é!",))
    deltas = [detok.append([t]) for t in tok.encode("caf\u00e9 ok, caf\u00e9! done")]
    assert "".join(deltas) + detok.finish() == "café ok, caf"
    assert all("\ufffd" not in d for d in deltas)
