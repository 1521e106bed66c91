"""Replacing a directory so that a crash at any moment leaves the old one or the new one.

A new directory is written beside the target under a temporary name that carries the writer's
process id (``.NAME.streamc-tmp-PID-XXXX``), then swapped into place: with Linux's
``renameat2(RENAME_EXCHANGE)`` the two names trade places in one atomic step; where that is not
available, the old directory is renamed aside (``.NAME.streamc-old-PID-XXXX``) and the new one
into place. Leftovers of a writer that died (its process id no longer runs) are cleaned by the
next :func:`recover`: a temporary directory is deleted, and an old directory whose target is
missing (a crash between the two renames) is put back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

_TMP, _OLD = "streamc-tmp", "streamc-old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    """glibc's ``renameat2`` (Linux 3.15+, glibc 2.28+), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    return function


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the file system or kernel does not support it
    raise OSError(code, os.strerror(code), str(b))


def _mark(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def make_temp(target: Path) -> Path:
    """A new empty directory beside ``target`` for writing its replacement (permissions as
    the umask says, like any directory the user creates)."""
    tmp = Path(tempfile.mkdtemp(prefix=_mark(target, _TMP), dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def install(tmp: Path, target: Path) -> None:
    """Put the finished directory ``tmp`` in place of ``target`` (which may not exist)."""
    if not target.exists():
        try:
            os.rename(tmp, target)
            return
        except OSError as exc:  # another writer created the target meanwhile
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.exists():
                raise
    if exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old directory
        return
    old = Path(tempfile.mkdtemp(prefix=_mark(target, _OLD), dir=target.parent))
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if not target.exists():
            os.rename(old, target)  # put the old directory back
        raise
    shutil.rmtree(old, ignore_errors=True)


_LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>{_TMP}|{_OLD})-(?P<pid>\d+)-[^/]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def leftovers(target: Path) -> list[tuple[Path, str]]:
    """(path, ``"streamc-tmp"`` or ``"streamc-old"``) of the temporary and old directories of
    ``target`` whose writer no longer runs."""
    if not target.parent.is_dir():
        return []
    found = []
    for entry in target.parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == target.name and not _alive(int(match["pid"])):
            found.append((entry, match["kind"]))
    return sorted(found)


def recover(target: Path) -> None:
    """Clean up after writers of ``target`` that died: put an old directory back when the
    target is missing (a crash between the two renames), delete the rest."""
    for entry, kind in leftovers(target):
        if kind == _OLD and not target.exists():
            try:
                os.rename(entry, target)
                continue
            except OSError:
                pass
        shutil.rmtree(entry, ignore_errors=True)
