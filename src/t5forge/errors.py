"""The one exception type for bad user input.

Anything the user can fix (a missing file, a wrong config key, a tokenizer that does not fit the
model) is raised as `T5ForgeError` with a message that says what is wrong and what to do. The CLI
prints it as a single line; everything else is a bug and keeps its traceback.
"""


class T5ForgeError(Exception):
    """A problem with the user's input, reported as one actionable line."""
