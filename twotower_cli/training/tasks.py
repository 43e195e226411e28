"""Synthetic tasks with exact answers, for training and benchmarking the embedded tiny model.

Why synthetic: every answer is a deterministic function of its prompt, so "AR quality" and
"diffusion quality" are exact-match rates, not judgements. Answers are 7-24 characters (one or
two blocks of 16 with EOS), so block-wise decoding is really exercised.

A prompt is the task's question followed by SEPARATOR ("="); the chat template of the tiny
tokenizer renders a user message the same way. Examples:

    copy qwertyuiop=        -> qwertyuiop
    reverse abcdefgh=       -> hgfedcba
    sort dcbadcba=          -> aabbccdd
    count banana=           -> a3b1n2
    recall ab:x1y2z3w4 cd:k9m8n7p6;cd=   -> k9m8n7p6

Held-out split: a prompt belongs to the evaluation set iff a stable hash (blake2b) of its text
falls in the first EVAL_FRACTION of the range. Training streams skip those prompts, so the
evaluation prompts are never seen in training, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator

SEPARATOR = "="
TASKS = ("copy", "reverse", "sort", "count", "recall")
EVAL_FRACTION = 0.05

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
MIN_LEN, MAX_LEN = 8, 24  # copy / reverse / sort string lengths


def is_eval_prompt(prompt: str) -> bool:
    """True iff `prompt` belongs to the held-out evaluation split (a stable hash, not Python's)."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "big")
    return h < EVAL_FRACTION * 2**64


def _string(rng: random.Random, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def _copy(rng: random.Random) -> tuple[str, str]:
    s = _string(rng)
    return f"copy {s}", s


def _reverse(rng: random.Random) -> tuple[str, str]:
    s = _string(rng)
    return f"reverse {s}", s[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    s = _string(rng)
    return f"sort {s}", "".join(sorted(s))


def _count(rng: random.Random) -> tuple[str, str]:
    """Character histogram: each distinct letter in alphabetical order followed by its count."""
    s = _string(rng)
    return f"count {s}", "".join(f"{c}{s.count(c)}" for c in sorted(set(s)))


def _recall(rng: random.Random) -> tuple[str, str]:
    """Key-value recall: 3-5 pairs `key:value`, then a query key; the answer is its value."""
    n = rng.randint(3, 5)
    keys: list[str] = []
    while len(keys) < n:
        k = "".join(rng.choice(LETTERS) for _ in range(2))
        if k not in keys:
            keys.append(k)
    values = ["".join(rng.choice(LETTERS + DIGITS) for _ in range(rng.randint(8, 12))) for _ in keys]
    q = rng.randrange(n)
    pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    return f"recall {pairs};{keys[q]}", values[q]


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "recall": _recall,
}


def make_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt_text, answer_text); prompt_text ends with SEPARATOR."""
    question, answer = GENERATORS[task](rng)
    return question + SEPARATOR, answer


def train_stream(seed: int, tasks: tuple[str, ...] = TASKS) -> Iterator[tuple[str, str, str]]:
    """Endless (task, prompt, answer) for training, round-robin over `tasks` (a task listed twice
    gets twice the examples), held-out prompts skipped."""
    rng = random.Random(f"train-{seed}")
    while True:
        for task in tasks:
            while True:
                prompt, answer = make_example(task, rng)
                if not is_eval_prompt(prompt):
                    break
            yield task, prompt, answer


def eval_set(n_per_task: int = 100, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[tuple[str, str, str]]:
    """The held-out evaluation set: `n_per_task` (task, prompt_text, answer_text) per task.

    Deterministic in (n_per_task, seed); prompts are distinct and all in the held-out hash split,
    so none of them is ever a training prompt. Grouped by task, in `tasks` order.
    """
    out: list[tuple[str, str, str]] = []
    for task in tasks:
        rng = random.Random(f"eval-{seed}-{task}")
        seen: set[str] = set()
        while len(seen) < n_per_task:
            prompt, answer = make_example(task, rng)
            if is_eval_prompt(prompt) and prompt not in seen:
                seen.add(prompt)
                out.append((task, prompt, answer))
    return out
