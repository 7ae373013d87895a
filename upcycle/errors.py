"""The one error type the library raises for bad input; the CLI turns it into exit code 2."""


class UpcycleError(Exception):
    """A problem with the user's input or environment, stated in one line with what to do about it."""
