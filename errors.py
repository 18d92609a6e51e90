"""The one exception type that the CLI turns into a single line and exit status 2, and the wording of its lines."""

import difflib


class KvbenchError(Exception):
    """Bad input or an unusable environment, explained in one line for the user.

    Library code raises it with a message that names the file, line, option or
    value at fault; `kvbench.cli` prints ``error: <message>`` and exits 2, so the
    user never sees a traceback for a mistake they can fix.
    """


class TaskDataUnavailable(KvbenchError):
    """A task's source data can be had neither locally nor from the hub; a run of several tasks goes on
    without it (see `kvbench.harness.grid.tasks_with_data`)."""


def error_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


#: longest part of an unknown name that an error message repeats
_NAME_ECHO_CHARS = 40


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """"unknown task 'qaspr'; did you mean qasper?": the closest known names, or the whole list when it is
    short, and the unknown name cut short, so that one error stays one readable line whatever was typed."""
    shown = name if len(name) <= _NAME_ECHO_CHARS else name[:_NAME_ECHO_CHARS] + "..."
    close = difflib.get_close_matches(name[:100], known, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(close)}?"
    elif len(known) <= 10:
        hint = f"known {kind}s: {', '.join(known)}"
    else:
        hint = f"known {kind}s include {', '.join(known[:4])}, ... ({len(known)} in all)"
    return f"unknown {kind} {shown!r}; {hint}"
