"""Writing outputs so that nothing is lost and nothing is left behind.

Every command that writes goes through here:

* before anything is created, :func:`check_target` refuses a path that cannot
  be written and :func:`check_space` one whose filesystem lacks the bytes the
  output will take (known in advance: a relaxed checkpoint is the size of the
  merge it streams, an artifact is serialised first);
* files and directories are written under a temporary name beside their
  target, ``.NAME.aim-partial-PID`` (same filesystem), and renamed into place
  only when complete (:func:`staged_file`, :func:`staged_directory`);
* on success, on an error, on Ctrl-C and on SIGTERM (turned into
  :class:`Terminated` by :func:`terminate_as_interrupt` in the CLI) the
  temporaries are removed;
* after a SIGKILL they stay, and the next run that writes the same target
  removes them first (:func:`remove_stale`): only names of that exact pattern
  whose process is gone, never anything else.

Temporary directories (calibration's disk offload) follow the same rule:
``PREFIX-PID-XXXXXXXX`` in the system temporary directory, removed when done,
and swept by a later run once their process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from mergekit_aim.errors import OutputError

LOG = logging.getLogger(__name__)

PARTIAL = ".aim-partial-"
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes free for this user on the filesystem holding ``directory`` (the
    one probe every free-space check uses; tests patch it)."""
    return shutil.disk_usage(directory).free


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_target(target: str | os.PathLike, *, directory: bool) -> None:
    """Refuse an output path that cannot be created or written, before
    anything is: a file where a directory is wanted (or the reverse), an
    ancestor that is a file, or a directory this user may not write to."""
    target = Path(target)
    if target.exists():
        if directory and not target.is_dir():
            raise OutputError(f"output {target} exists and is not a directory")
        if not directory and target.is_dir():
            raise OutputError(f"output {target} is a directory, not a file")
    where = nearest_existing(target.parent)
    if not where.is_dir():
        raise OutputError(f"cannot write {target}: {where} is not a directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: {where} is not writable")
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {target}: it is not writable")


def check_space(target: str | os.PathLike, needed: int) -> None:
    """Refuse, in one line, to write ``needed`` bytes at ``target`` when its
    filesystem has fewer free."""
    where = nearest_existing(Path(target).parent)
    free = free_bytes(where)
    if needed > free:
        raise OutputError(
            f"not enough space in {where} for {target}: needs {needed:,} bytes, "
            f"{free:,} free"
        )


def partial_path(target: str | os.PathLike) -> Path:
    """This process's temporary name for ``target``, beside it."""
    target = Path(target)
    return target.parent / f".{target.name}{PARTIAL}{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call in this process: stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale(target: str | os.PathLike) -> None:
    """Remove the temporaries a killed run left for ``target``: names
    ``.NAME.aim-partial-PID`` beside it whose process no longer runs."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}{re.escape(PARTIAL)}(\d+)")
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            found = pattern.fullmatch(entry.name)
            if found and not _alive(int(found.group(1))):
                LOG.info("removing %s, left by an interrupted run", entry.path)
                _remove(Path(entry.path))


@contextlib.contextmanager
def no_space_as_error(target: str | os.PathLike) -> Iterator[None]:
    """Report a disk that filled up while writing as one :class:`OutputError`."""
    try:
        yield
    except OSError as error:
        if error.errno not in _NO_SPACE:
            raise
        target = _final_name(Path(target).absolute())
        raise OutputError(
            f"no space left in {target.parent} while writing {target} "
            f"({error.strerror}); nothing was written"
        ) from None


def _final_name(path: Path) -> Path:
    """``path`` with each temporary component named as its target."""
    pattern = re.compile(rf"\.(.+){re.escape(PARTIAL)}\d+")
    return Path(
        *(
            found.group(1) if (found := pattern.fullmatch(part)) else part
            for part in path.parts
        )
    )


@contextlib.contextmanager
def staged_file(target: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it to ``target`` when
    the block succeeds, remove it when the block raises (anything, Ctrl-C
    included). ``needed`` bytes, when given, are checked first."""
    with _staged(Path(target), needed, directory=False) as partial:
        yield partial


@contextlib.contextmanager
def staged_directory(
    target: str | os.PathLike, needed: int | None = None
) -> Iterator[Path]:
    """Yield an empty directory beside ``target`` to write the output in.

    When the block succeeds, the directory becomes ``target`` (renamed) or,
    if ``target`` already exists, its files are renamed into ``target``,
    replacing files of the same name and leaving others alone (a rerun into an
    earlier output overwrites it). When the block raises, it is removed and
    ``target`` is as it was. ``needed`` bytes, when given, are checked first.
    """
    with _staged(Path(target), needed, directory=True) as stage:
        yield stage


@contextlib.contextmanager
def _staged(target: Path, needed: int | None, *, directory: bool) -> Iterator[Path]:
    """What both staged forms share: checks first, stale temporaries swept,
    the temporary committed on success (renamed, or for a directory merged
    into an existing ``target``) and removed, with any parents this call
    created, otherwise."""
    check_target(target, directory=directory)
    if needed is not None:
        check_space(target, needed)
    created = _make_parents(target)
    remove_stale(target)
    partial = partial_path(target)
    if directory:
        partial.mkdir()
    try:
        with no_space_as_error(target):
            yield partial
        if directory:
            _commit(partial, target)
        else:
            os.replace(partial, target)
        created = None
    finally:
        _remove(partial)
        if created is not None:
            _remove(created)


def _make_parents(target: Path) -> Path | None:
    """Create ``target``'s missing parents; return the topmost one created
    (removed again if the write fails), or None."""
    missing = nearest_existing(target.parent)
    created = None
    if missing != target.parent.absolute():
        created = target.parent.absolute()
        while created.parent != missing:
            created = created.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    return created


def _commit(stage: Path, target: Path) -> None:
    if not target.exists():
        os.rename(stage, target)
        return
    for entry in sorted(stage.iterdir()):
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            _commit(entry, destination)
        else:
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(entry, destination)


def temporary_directory(prefix: str) -> Path:
    """Create ``PREFIX-PID-XXXXXXXX`` in the system temporary directory, after
    removing those of this prefix whose process is gone; the caller removes
    it (see :func:`remove_tree`)."""
    root = Path(tempfile.gettempdir())
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-\w+")
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            found = pattern.fullmatch(entry.name)
            if found and entry.is_dir() and not _alive(int(found.group(1))):
                LOG.info("removing %s, left by an interrupted run", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))


def remove_tree(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[list[int]]:
    """Inside the block, SIGTERM raises :class:`Terminated` (a
    KeyboardInterrupt), so that cleanup runs as it does on Ctrl-C; a second
    SIGTERM is ignored while that cleanup runs. The previous handlers are
    restored afterwards. A no-op outside the main thread.

    Yields the list of signals received in the block. The exception a signal
    raises can surface as another one when it arrives inside a library's
    native code (safetensors turns it into a ``ValueError`` mid-read), so the
    caller asks this list, not the exception's type, whether it was stopped.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_term(signum, frame):
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    def on_int(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt()

    previous_term = signal.signal(signal.SIGTERM, on_term)
    previous_int = signal.signal(signal.SIGINT, on_int)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
