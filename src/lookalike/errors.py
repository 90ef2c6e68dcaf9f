"""The exception types for a user's mistake: the CLI prints the message on one line and exits non-zero."""


class LookalikeError(Exception):
    """A problem the user can fix (bad config, missing file, wrong format). Its message names the culprit."""

    exit_code = 2


class RunBusy(LookalikeError):
    """Another process is training this run now: nothing was done, and nothing is wrong with the run."""

    exit_code = 75  # EX_TEMPFAIL; the sweep reads it as 'running elsewhere'


def filesystem_problem(error: BaseException) -> str | None:
    """A failed write or read of the file system in words, naming the place; None for any other error."""
    import errno
    import sqlite3

    if isinstance(error, sqlite3.OperationalError):  # results.sqlite
        text = str(error)
        if "disk is full" in text:
            return "no space left on the device for the workspace's results.sqlite: free some space and run again"
        if "readonly" in text or "unable to open" in text:
            return f"cannot write the workspace's results.sqlite ({text}): is the workspace read-only?"
        return None
    if not isinstance(error, OSError) or error.errno is None:
        return None
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if error.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{what}{where}: free some space, then run the same command again (it continues where it stopped)"
    if error.errno == errno.EROFS:
        return f"cannot write{where}: the file system is read-only"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}"
    return None
