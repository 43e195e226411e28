"""Shared pytest setup."""

import os

import torch

# The tests use tiny shapes: one intra-op thread is fastest, and on a shared or busy machine
# several OpenMP threads spin against each other (measured: a tiny forward 4 ms with one thread,
# 870 ms with two on a loaded 2-core box). Override with TWOTOWER_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("TWOTOWER_TEST_THREADS", "1")))
