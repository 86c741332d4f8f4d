"""The one base class of errors that are the user's to fix (a path, a file, a flag).

The command dispatcher (``motion_data.common.cli``) prints these as one line and exits with 2,
without a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, a missing or foreign folder, a refused flag; the message names the path
    and the way out, in one line."""


class DataError(UserError, ValueError):
    """An input that cannot be used as it is: a track file, a build folder, a shard, a
    manifest, a checkpoint, a run folder, a metrics log; the message names the path."""


class SettingError(UserError, ValueError):
    """A setting (a config key, a flag) whose value cannot work here, e.g. fp16 without CUDA
    or a validation split that leaves no clips, or an optional package or simulator that the
    setting needs and this machine lacks; the message names the setting and the way out."""


def one_line(e, path: str | None = None) -> str:
    """An exception's (or a message's) text on one line (libraries put newlines in theirs),
    starting with ``path`` when given."""
    msg = " ".join(str(e).split())
    return msg if path is None or msg.startswith(str(path)) else f"{path}: {msg}"


def some_names(names, n: int = 4) -> str:
    """``a, b, c and 5 more``: the first ``n`` of ``names``, for a one-line message."""
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
