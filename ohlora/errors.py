"""The one exception type that the stage scripts turn into a one-line message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix (bad input, missing weights, wrong file). The message is one line."""


class WeightsUnavailable(PipelineError):
    """A weights file is missing and could not be downloaded."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type's name), for one-line error messages."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
