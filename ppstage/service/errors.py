"""Errors of the service layer."""

from __future__ import annotations

from ppstage.errors import PPStageError


class StreamUnavailable(PPStageError):
    """The stream is not taking intents (not started yet, or draining): the API answers 503."""
