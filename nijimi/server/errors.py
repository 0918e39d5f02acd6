"""The server's own errors: a refused HTTP request (with its status) and a cancelled job.

Every other :class:`~nijimi.errors.NijimiError` a request causes (a bad value, an unreadable image, an unknown LoRA)
is answered 422; anything else 500. Responses are always ``{"error": KIND, "detail": MESSAGE}``, A1111's shape.
"""

from __future__ import annotations

from typing import Any

from nijimi.errors import NijimiError


class ApiError(NijimiError):
    """A request the server refuses: HTTP ``status``, A1111's ``error`` kind and the message (``detail``)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error


class Cancelled(NijimiError):
    """A job stopped by ``/sdapi/v1/interrupt``: raised in the step callback, so the batch being sampled is dropped
    and nothing half-made is kept or written; ``partial`` is what the job finished before (its complete images)."""

    def __init__(self, message: str, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial
