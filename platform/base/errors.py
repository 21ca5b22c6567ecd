"""Errors the command line turns into exit codes."""
import specreg


class BadInput(specreg.ConfigError):
    """The user's input is wrong (exit code 2); raised before anything is created.

    The platform's one class for bad input. It is a `specreg.ConfigError`, the library's, so the command line
    maps that one base (a config the library refuses, or input the platform refuses) to exit code 2."""
