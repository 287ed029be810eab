"""One exception type for every data-layer failure a user can fix.

Every message is one line that names the thing that is wrong and the command or setting that fixes it, e.g.
``unknown task 'strategyq'; did you mean strategyqa? (list: python -m data.tasks)``. It subclasses ValueError so
callers that already catch bad values keep working.
"""


class LoramuxDataError(ValueError):
    """Bad input or a missing/corrupt asset; the message says what and how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class AssetUnavailable(LoramuxDataError):
    """A pinned asset its source does not offer now (the index lists no such file, or no index answers).

    Not a corrupt or wrong file (those stay `LoramuxDataError`): `python -m data.fetch --skip-unavailable` (what
    `make test` runs) reports it in one line and goes on, so the tests that read it skip and say why."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail  # the source's own words (pip's last ERROR line), for a caller that words its own line
