"""The one exception type users see.

A UserError carries a single line that names what is wrong (a file and line, or a config key).
The CLI prints it as `loralab: error: <message>` and exits with code 2, with no traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a data file line, a model path."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
