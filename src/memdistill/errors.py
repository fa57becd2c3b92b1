"""The one exception type that means "the user gave bad input"."""


class UserError(Exception):
    """Bad input: the command line prints the message on one line and exits with code 2."""
