"""The base of every error a user can cause (a bad config value, a missing or malformed data file, a damaged
checkpoint or tokenizer): a stage's command line reports these as one line and exits 2, anything else is a bug
and keeps its traceback. A leaf: it imports nothing of the project."""


class UserError(Exception):
    """Something the user gave is wrong or missing; the message names it."""
