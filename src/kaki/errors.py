"""The one exception type kaki raises for problems a user can fix.

Every message says what was wrong and how to fix it; the CLI prints it as one line and exits 2,
the server turns it into a 4xx. Anything else escaping kaki is a bug.
"""


class KakiError(Exception):
    """A user-fixable problem: a bad path, checkpoint, flag or request field."""


class RankLost(Exception):
    """Another process of a torchrun job stopped answering (kaki.engine.mirror): neither the user's
    input nor a bug here, and the job cannot go on; the CLI prints it as one line and exits 1."""


class CheckpointError(KakiError):
    """A model directory or weight file that cannot be loaded as it is."""


class ParamError(KakiError, ValueError):
    """A bad sampling or request parameter; `field` names it for HTTP error bodies."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
