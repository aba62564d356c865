"""One base for the errors tollwatch raises on purpose, and one formatter for every error a person reads.

Why: the CLI, the HTTP routes and the flows' failure events each used to pick which exceptions were "the user's"
and how to print them. Now an error raised on purpose derives from `TollwatchError` (its message is a sentence
that says what happened and what to do), and `describe` is the only place that turns any exception into the
line a person sees: the CLI prints it, an HTTP route answers with it, a failed flow announces it.

Standard library only (pydantic is imported lazily), like the rest of the contract.
"""

from __future__ import annotations


class TollwatchError(Exception):
    """An error tollwatch raises on purpose; the message is written for the person who has to act on it.

    `status` is the HTTP status a route answers with when this error reaches it: 4xx when the caller can fix
    the request, 5xx when the service (its configuration, or a dependency) must be fixed.
    """

    status: int = 500


class ConfigurationError(TollwatchError):
    """A setting is missing or inconsistent; the message says which and how to fix it."""


#: How many characters of an error a person is shown (events and HTTP bodies must stay small).
MAX_MESSAGE = 2000


def describe(error: BaseException) -> str:
    """The one line a person reads for `error`.

    - a `TollwatchError` is already a sentence: shown as it is;
    - a pydantic `ValidationError` becomes `field: problem; …`, never the input values (they may be secrets);
    - anything else (a bug, or a library's error nobody wrapped) is named by its class, so it can be searched for.
    """
    if isinstance(error, TollwatchError):
        text = str(error)
    elif _is_validation_error(error):
        problems = error.errors()  # type: ignore[attr-defined]
        text = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'input'}: {p['msg']}" for p in problems)
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text[:MAX_MESSAGE]


def _is_validation_error(error: BaseException) -> bool:
    try:
        from pydantic import ValidationError
    except ImportError:  # a cluster with only the contract and pyspark
        return False
    return isinstance(error, ValidationError)
