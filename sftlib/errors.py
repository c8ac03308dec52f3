"""The one exception the project raises for a user's input (sftlib/common.py re-exports it; sftlib/readers.py,
which common.py calls, takes it from here, so neither imports the other back)."""


class UserError(Exception):
    """A problem with the user's input: every entry point prints it as one line and exits with code 2.
    The concept files (ddpm.py, shortft.py, ...) import nothing from here and raise plain ValueError for
    arguments outside their equations' domain; run_main prints those as one line too. (Not a ValueError
    itself: argparse would swallow it in a type conversion and print its own message instead.)"""
