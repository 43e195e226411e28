"""The tiny model's character-level tokenizer, written as plain Hugging Face files.

Why a tokenizer.json and not a custom class: the engine loads every tokenizer through
`transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`, and a fast tokenizer
described by tokenizer.json needs no code from the checkpoint directory (SPEC.md §4: never execute
checkpoint code).

Ids: <pad>=0, <s>=1 (BOS), </s>=2 (EOS), <mask>=3 (SPEC's default mask id), <unk>=4, then one id
per character of CHARS. Encoding prepends BOS; any character outside CHARS becomes <unk> (one per
character), so every Unicode prompt encodes. Decoding joins characters without spaces.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors

from .tasks import SEPARATOR

SPECIALS = ["<pad>", "<s>", "</s>", "<mask>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, MASK_ID, UNK_ID = range(5)
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]  # printable ASCII, newline, tab

# User turns render as their text; the assistant turn starts after SEPARATOR (the tasks' "=").
# System messages are not rendered: the tiny model was never trained on them.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + SEPARATOR + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + SEPARATOR + "{% endif %}"
)


def vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIALS + CHARS)}


def build_tokenizer() -> Tokenizer:
    """The fast tokenizer: BPE with no merges is exactly one token per character, <unk> otherwise."""
    tok = Tokenizer(models.BPE(vocab=vocab(), merges=[], unk_token="<unk>", fuse_unk=False))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def save_tokenizer(out_dir: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
