"""Decoding. The data path's engine stage, split by job:

    engine.py      Engine: the step loop (schedule -> commit -> denoise -> retire)
    scheduler.py   policy only: admission, which rows commit and which denoise
    runner.py      tensors and forwards: slot pool, batched prefill, commits, denoiser steps
    row.py         one row's typed state (a Phase) and its transitions
    decode.py      the rules: token choice, the threshold commit rule, the output cut
    cache.py       per-row context caches (the slot pool) and the denoiser's mirror of them
    request.py     what goes in (Request) and comes out (Result, Stats)
    generation.py  the release's generate_* API on the model (TwoTowerForGeneration, load_model)
    reference.py   the executable spec: a naive lockstep loop every faster path is tested against
"""

from .engine import Engine
from .request import Request, Result, Stats

__all__ = ["Engine", "Request", "Result", "Stats"]
