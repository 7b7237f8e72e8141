"""The one exception family and the one exit-code enum of routelog.

The core raises these with the file, row or key at fault; only the CLI turns them into a
one-line message on stderr and an exit code.
"""

from __future__ import annotations

import re
from enum import IntEnum

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    r"""``text`` with control characters (ESC, newlines, C0, DEL, C1) shown as escapes.

    Every name routelog prints (file and run names in messages and reports) goes through
    this, so a file named ``ESC[2J`` cannot clear the terminal or split a message in two.
    A byte of a file name that is not UTF-8 (a lone surrogate in Python) is shown as that
    byte, ``\xff``: it could not be written to a UTF-8 stream.

    Examples
    --------
    >>> printable("run\x1b[2J\nname"), printable("caf\udce9")
    ('run\\x1b[2J\\nname', 'caf\\xe9')
    """
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the undecodable byte code - 0xDC00
        code -= 0xDC00
    return named.get(char, f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


class ExitCode(IntEnum):
    """Process exit codes, the same for every command."""

    OK = 0
    CHECK_FAILED = 1
    BAD_INPUT = 2
    INTERNAL = 70  # a bug in routelog (EX_SOFTWARE); the message asks for a report
    OUT_OF_MEMORY = 71  # the machine or its limits, not the input (EX_OSERR)
    INTERRUPTED = 130
    BROKEN_PIPE = 141  # stdout closed early (`routelog ... | head`): 128 + SIGPIPE, as a shell says


class RoutelogError(Exception):
    """Base of every error routelog raises on purpose; its message is one line for the user."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class InputError(RoutelogError):
    """A log file or directory cannot be read as routing data (names the file, row or key)."""


class UnsafeFileError(InputError):
    """A .pt file holds something other than tensors and plain containers; nothing was run."""


class ChangedError(InputError):
    """An object in a bucket was replaced while it was read; reading it again is the fix."""


class ConfigError(RoutelogError):
    """A configuration file or option value is invalid (names the key)."""


class UsageError(RoutelogError):
    """Command-line arguments are inconsistent with each other or with the data."""


class MissingExtraError(RoutelogError):
    """A feature needs an optional dependency (an extra) that is not installed."""


class RecordError(RoutelogError):
    """A model's routers cannot be found or recorded as configured (names what was searched)."""
