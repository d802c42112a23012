"""Errors that the CLI turns into one line on stderr and exit code 2."""


class QnkitInputError(ValueError):
    """Bad input from the user: a file, a folder, a setting or an argument that cannot be used."""
