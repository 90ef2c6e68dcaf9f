"""The one exception type for a user's mistake: the CLI prints its message on one line and exits non-zero."""


class LookalikeError(Exception):
    """A problem the user can fix (bad config, missing file, wrong format). Its message names the culprit."""
