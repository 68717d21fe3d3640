"""The one exception type users see from e2u.

Every input problem is raised as :class:`E2UError` with a single line that says what was wrong
and what is accepted. The command-line entry points print it as that one line (no traceback);
library users get an ordinary ``ValueError`` subclass they can catch.
"""


class E2UError(ValueError):
    """A user-facing error: one line, what was wrong and what is accepted."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
