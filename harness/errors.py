"""How errors travel: one error type for what the user can fix, one place that prints it.

Code raises `HarnessError` (or a subclass: DataError, SplitError, ...) where it finds the
problem, with the sentence the user should read. The CLI's top-level group (harness/cli.py)
turns it, and the OS and database errors a user can act on (disk full, permission denied,
name too long, connection lost), into one `error: ...` line and an exit code. Anything else
is a bug and keeps its traceback. Every message passes `mask_secrets` first.
"""
from __future__ import annotations

import errno
import re

# scheme://user:password@host -> scheme://user:***@host (registry URLs, in any message)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):(?P<pw>[^@\s'\"/]*)@")
# key=value passwords in DSN-style strings ("password=...")
_KV_PASSWORD = re.compile(r"(?i)(?P<head>\bpassword\s*=\s*)(?P<pw>[^\s'\"&;]+)")


class HarnessError(Exception):
    """A problem the user can fix; str(e) is the one line they see, exit_code what the shell gets."""
    exit_code = 1


def mask_secrets(text: str) -> str:
    """Hide passwords in URLs and key=value strings; everything else passes unchanged."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:***@", str(text))
    return _KV_PASSWORD.sub(lambda m: f"{m['head']}***", text)


# errno -> what it means for the user, in words
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or choose another folder",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another folder",
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: check the folder's permissions",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter path",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
    errno.EISDIR: "a folder is where a file was expected",
    errno.ENOTDIR: "a file is where a folder was expected",
}


def describe_os_error(e: OSError) -> str | None:
    """One line for an OSError a user can act on; None for the others (bugs keep their traceback)."""
    advice = _OS_ADVICE.get(e.errno)
    if advice is None and isinstance(e, FileNotFoundError):
        advice = "file or folder not found"
    if advice is None:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{advice}"


def user_message(e: BaseException) -> str | None:
    """The one line to print for `e`, or None when `e` is a bug (show the traceback)."""
    if isinstance(e, HarnessError):
        return mask_secrets(str(e))
    if isinstance(e, OSError):
        msg = describe_os_error(e)
        return mask_secrets(msg) if msg else None
    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(e, OperationalError) or (isinstance(e, DBAPIError) and e.connection_invalidated):
        first = str(getattr(e, "orig", e)).strip().splitlines()
        return mask_secrets(f"the registry is unreachable ({first[0] if first else e.__class__.__name__}); "
                            "check that the database server is up and the URL is right")
    return None
