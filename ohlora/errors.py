"""The one exception type that the stage scripts turn into a one-line message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix (bad input, missing weights, wrong file). The message is one line."""


class WeightsUnavailable(PipelineError):
    """A weights file is missing and could not be downloaded."""
