"""Errors that reach the user as one clear line (the CLI prints them and exits with code 2)."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: says what was expected and how to fix it."""


class DataError(UsageError):
    """A dataset on disk is missing, malformed or does not match its split."""
