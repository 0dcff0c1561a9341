"""Errors a user can act on.  The CLI prints these as one clear line (no traceback)."""


class UserError(Exception):
    """Base class: bad input, a bad model directory, an impossible setting."""
