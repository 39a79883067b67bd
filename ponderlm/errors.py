"""User-facing errors: the CLI prints these as one line and exits with status 2, never a traceback."""

import errno


class PonderError(Exception):
    """A problem with the user's input (config, data, run directory) that the user can fix."""


def explain_os_error(exc: OSError) -> str:
    """One line for an error the operating system raised: what failed, on which path, and what to do."""
    path = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None) or "(no path given)"
    hint = {errno.ENOSPC: "no space left on the device; free some space (or choose another directory) and rerun",
            errno.EDQUOT: "disk quota exceeded; free some space (or choose another directory) and rerun",
            errno.EACCES: "permission denied; check the path's permissions or choose another path",
            errno.EPERM: "operation not permitted; check the path's permissions or choose another path",
            errno.EROFS: "the file system is read-only; choose a writable directory",
            errno.ENOENT: "no such file or directory; check the path",
            errno.ENOTDIR: "a part of the path is not a directory; check the path",
            errno.EISDIR: "it is a directory; give a file",
            errno.ELOOP: "too many levels of symbolic links (a symlink loop); fix the link",
            errno.EIO: "an input/output error; the disk or the file may be damaged"}.get(exc.errno)
    return f"{path}: {hint or exc.strerror or exc}"
