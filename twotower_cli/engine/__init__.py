"""Decoding: the executable spec (reference), the step functions (decode) and the scheduler."""

from .request import Request, Result
from .scheduler import Engine

__all__ = ["Engine", "Request", "Result"]
