"""Errors the command line turns into exit codes."""


class BadInput(Exception):
    """The user's input is wrong (exit code 2); raised before anything is created."""
