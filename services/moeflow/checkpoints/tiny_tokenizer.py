"""A small byte-level BPE tokenizer trained in code, for the tiny test checkpoints.

Contract:
- `train_tiny_tokenizer()` is deterministic: same code -> same vocab, merges and ids.
- The base alphabet is printable ASCII plus space, tab, newline and carriage return (in GPT-2
  byte-level form). No raw byte >= 0x80 is in the vocab, so every id decodes on its own to a
  non-empty printable string (whitespace counts as printable here). Text outside that alphabet
  encodes to `<|endoftext|>`, which is also the unk and pad token.
- Special tokens have the lowest ids: `<|endoftext|>` = 0, `<|im_start|>` = 1, `<|im_end|>` = 2.
  `<|im_end|>` is the eos token. There is no bos token; nothing is prepended.
- `CHATML_TEMPLATE` renders `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message and, with
  `add_generation_prompt`, ends with `<|im_start|>assistant\\n`.
"""

from __future__ import annotations

import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TARGET_VOCAB_SIZE = 512
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
MODEL_MAX_LENGTH_TOKENS = 2048

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_PARAGRAPHS = """\
The river runs past the old mill and into the town. In the morning the baker opens his shop,
and the smell of fresh bread drifts along the street. Children walk to school with their bags,
and the teacher waits for them at the gate. It is a small town, but it is never quiet.

Paris is the capital of France. Berlin is the capital of Germany, and Rome is the capital of
Italy. Madrid is the capital of Spain. London is the capital of the United Kingdom. Each city
has a long history, many museums, and a river that runs through its center.

What is the weather like today? It is sunny and warm, with a light wind from the west. Tomorrow
there may be rain in the afternoon, so take a coat if you go outside. The sky was clear last
night, and we could see the moon and many stars.

A computer reads a program one instruction at a time. The program tells it what to do: add two
numbers, store a value, or jump to another line. Models that write text do something similar:
they read a prompt, then predict the next word, then the next, until they reach the end.

Hello! How are you? I am fine, thank you. Can you help me with a question? Of course, I would be
happy to help. Please tell me what you need, and I will do my best to answer it clearly.

Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 42 100 256 512 1024 2048. Symbols: + - * / = < > ( ) [ ]
{ } # $ % & @ ! ? . , ; : ' " _ ~ ^ | \\ `. Tabs\tand\tnew
lines are text too.
"""

_SUBJECTS = ("the cat", "a dog", "my friend", "the teacher", "our team", "the model", "she", "he")
_VERBS = ("likes", "sees", "finds", "reads", "writes", "wants", "makes", "takes")
_OBJECTS = ("the book", "a red apple", "the long road", "some water", "the answer", "a new idea")


def tiny_corpus() -> list[str]:
    """The training text: the paragraphs above plus simple generated sentences."""
    sentences = [
        f"{subject.capitalize()} {verb} {obj}."
        for subject, verb, obj in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)
    ]
    lines = _PARAGRAPHS.splitlines(keepends=True)
    return lines + [" ".join(sentences[i : i + 4]) + "\n" for i in range(0, len(sentences), 4)]


def _base_alphabet() -> list[str]:
    """Printable ASCII plus tab, newline, CR and space, as GPT-2 byte-level characters.

    Bytes 33..126 map to themselves; bytes 0..32 map to chr(256 + byte).
    """
    printable = [chr(byte) for byte in range(33, 127)]
    whitespace = [chr(256 + byte) for byte in (9, 10, 13, 32)]
    return printable + whitespace


def train_tiny_tokenizer(vocab_size: int = TARGET_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `tiny_corpus()` and wrap it for transformers."""
    tokenizer = Tokenizer(models.BPE(unk_token=ENDOFTEXT, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_base_alphabet(),
        limit_alphabet=len(_base_alphabet()),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=MODEL_MAX_LENGTH_TOKENS,
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE,
    )
