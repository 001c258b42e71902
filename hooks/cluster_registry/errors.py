"""The error hierarchy.

Every error carries a user-facing message (safe for Events, status and CLI output: it never holds a
credential) and is either temporary (retry later) or permanent (retrying will not help until someone
changes something).
"""

from __future__ import annotations


class ClusterRegistryError(Exception):
    """Base class. ``str(err)`` is the user-facing message; ``detail`` is extra text for logs."""

    temporary: bool = False

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    @property
    def reason(self) -> str:
        """A CamelCase reason for conditions and Events."""
        return type(self).__name__.removesuffix("Error") or "Error"


class TemporaryError(ClusterRegistryError):
    """Worth retrying: connection failures, 429, 5xx, a held write lock."""

    temporary = True


class WriteLockedError(TemporaryError):
    """The cluster registry refuses writes while garbage collection holds its write lock."""


class PermanentError(ClusterRegistryError):
    """Not worth retrying as is: bad input, missing image, denied access, corrupt data."""


class InvalidReferenceError(PermanentError):
    """An image reference that does not parse."""


class ConfigError(PermanentError):
    """A bad flag, value or file given by the operator."""
