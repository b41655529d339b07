"""Errors that bnlab reports to a person rather than as a traceback."""

from __future__ import annotations


class BnlabError(Exception):
    """A problem with what the user asked for (bad input, missing data, a broken file).

    The message names what is wrong and what was expected. The CLI prints it without a
    traceback and exits with code 2. Library callers can catch it like any exception.
    """

    exit_code = 2
