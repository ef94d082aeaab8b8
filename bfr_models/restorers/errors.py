"""The one error type of the restorer registry."""

from __future__ import annotations


class RestorerError(ValueError):
    """A restorer that cannot be loaded or run: unknown name, missing or unreadable file, wrong model. One line."""

    def __str__(self) -> str:
        return self.args[0]
