"""One line per user error for every `cscflow` command: exit code 2, no traceback.

Its own module so that commands living next to their code (submit in dispatch, chggen)
share it without importing the command-line group. ``CSCFLOW_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import functools
import os

import click

__all__ = ["UserError", "user_errors"]


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def _known() -> tuple[type[Exception], ...]:
    from cscflow.config import SpecError
    from cscflow.dispatch import DispatchError
    from cscflow.runlock import RunLocked
    from cscflow.runner import RunError
    from cscflow.stores import StoreError
    from cscflow.structures_io import StructureReadError

    return SpecError, RunError, RunLocked, StoreError, StructureReadError, DispatchError, FileNotFoundError


def user_errors(func):
    """Turn the known user-facing exceptions of ``func`` into one clear message."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except _known() as exc:
            if os.environ.get("CSCFLOW_DEBUG"):
                raise
            raise UserError(str(exc)) from None

    return wrapper
