"""The one exception type that the CLI turns into a single line and exit status 2."""


class KvbenchError(Exception):
    """Bad input or an unusable environment, explained in one line for the user.

    Library code raises it with a message that names the file, line, option or
    value at fault; `kvbench.cli` prints ``error: <message>`` and exits 2, so the
    user never sees a traceback for a mistake they can fix.
    """


def error_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
