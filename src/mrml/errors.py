"""Errors that reach the user as one clear line (the CLI prints them and exits with code 2)."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: says what was expected and how to fix it."""


class DataError(UsageError):
    """A dataset on disk is missing, malformed or does not match its split."""


class NonFiniteError(Exception):
    """Training produced a non-finite loss, gradient or parameter (the CLI exits with code 3)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the CLI exits with 128 + the signal number (130, 143)."""

    def __init__(self, signum: int, forced: bool = False):
        super().__init__(signum)
        self.signum = signum
        self.forced = forced  # a second Ctrl-C: stop now, without finishing the step or checkpointing
