"""Errors the user can fix. The CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (recipe, paths, checkpoints) and what to do about it."""
