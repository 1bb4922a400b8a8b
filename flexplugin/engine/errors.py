"""The one error type for bad user input: its message says what is wrong and how to fix it."""


class InputError(ValueError):
    """Bad input detected before heavy work; the CLI prints the message and exits with status 2."""
