"""Every error CryoLens raises on purpose, in one tree, and the HTTP status the server gives each.

    CryoLensError
    ├── InputError (also ValueError)       422  a volume or option the caller got wrong
    │   ├── MalformedBody                  400  not JSON / npy / MRC at all, or a lying header
    │   ├── UnsupportedMediaType           415  a Content-Type the endpoint does not read
    │   └── PayloadTooLarge                413  a body or batch over the configured limit
    ├── CheckpointError                     -   a checkpoint that cannot be found, fetched, trusted
    │   └── UnsafeCheckpointError           -   a pickle that would run code: refused, never run
    ├── DeviceError                         -   e.g. CUDA asked for where there is none
    ├── Busy                               503  the inference queue is full (with Retry-After)
    │   └── NotReady                       503  the model is still loading (with Retry-After)
    └── InferenceTimeout                   504  a request waited longer than its deadline

``server/handlers.py`` maps each class to its status once, walking the class's MRO, so a new
subclass inherits its parent's status. Anything else escaping a request is a bug: 500 with a
request id and no stack trace in the body.
"""
from __future__ import annotations


class CryoLensError(Exception):
    """Base of every error raised on purpose by this package."""


class InputError(CryoLensError, ValueError):
    """Bad input. ``field`` names the request field (or argument) at fault, when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class MalformedBody(InputError):
    """A body that cannot be read in its declared format at all (as opposed to a well-formed
    body with the wrong content, which is a plain InputError)."""


class UnsupportedMediaType(InputError):
    pass


class PayloadTooLarge(InputError):
    pass


class CheckpointError(CryoLensError):
    pass


class UnsafeCheckpointError(CheckpointError):
    pass


class DeviceError(CryoLensError):
    pass


class Busy(CryoLensError):
    pass


class NotReady(Busy):
    pass


class InferenceTimeout(CryoLensError):
    pass
