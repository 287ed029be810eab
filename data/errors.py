"""One exception type for every data-layer failure a user can fix.

Every message is one line that names the thing that is wrong and the command or setting that fixes it, e.g.
``unknown task 'strategyq'; did you mean strategyqa? (list: python -m data.tasks)``. It subclasses ValueError so
callers that already catch bad values keep working.
"""


class LoramuxDataError(ValueError):
    """Bad input or a missing/corrupt asset; the message says what and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
