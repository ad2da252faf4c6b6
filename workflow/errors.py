"""The project's own error types: what `workflow.cli.run` prints as one `error:` line without a traceback.

Anything else that escapes a step is a bug and keeps its traceback. Imports nothing, so every module can
raise these without an import cycle.
"""

from __future__ import annotations


class StepError(RuntimeError):
    """A failure the user can act on; printed as one line, without a traceback."""


class ParamsError(ValueError):
    """params.yaml is invalid; the message names the file and key."""
