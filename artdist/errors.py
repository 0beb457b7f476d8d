"""The errors that are part of artdist's interface: the CLI prints them as one line, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input (missing folder, wrong file...): printed as one clear line, exit status 2."""


class ConfigError(ValueError):
    """A job config is invalid; the message names the key, the source and what is allowed."""


class NonFiniteLossError(UserError):
    """The loss became NaN/inf; raised on every rank at the same step (the ranks agree first)."""
