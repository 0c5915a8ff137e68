"""Output files written atomically: a failed run never leaves a half-written or emptied file behind.

`OutputFiles` stages every file of one run in a temporary file beside its final path (same folder, same
suffix, so numpy and matplotlib see the format they expect) and renames them all into place only when the run
succeeds; on an error the temporaries are removed and earlier outputs stay byte for byte. `check_output`
rejects an output that names an input, or a folder that does not exist, before any work starts.

Floor 1 (see docs/ARCHITECTURE.md): the standard library only; it never imports another moeless module.
"""
from __future__ import annotations

import os
import tempfile

__all__ = ["OutputFiles", "check_output", "write_text"]


def check_output(path, what: str, inputs=()) -> str:
    """`path` as str if it can be written: its folder exists, it is not a folder, and it is not the same file as
    any of `inputs` (paths; None entries are skipped). ValueError naming `what` (e.g. "--out") otherwise."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{what}: the folder {os.path.dirname(path) or '.'!r} of {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path!r} is a folder; name a file")
    for src in inputs:
        if src is not None and _same_file(path, os.fspath(src)):
            raise ValueError(f"{what}: {path!r} is also an input ({os.fspath(src)!r}); write the output elsewhere")
    return path


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _mode_of(final: str) -> int:
    """The permission bits a file written at `final` should get: the existing file's, else 0666 less umask."""
    try:
        return os.stat(final).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class OutputFiles:
    """Files written together, renamed into place all at once.

        with OutputFiles() as out:
            np.savez(out.path("predictors.npz"), **arrays)   # writes a temporary beside predictors.npz
            out.write_text("report.md", text)
        # here both are in place; had the block raised, neither would have been touched
    """

    def __init__(self):
        self._pending: list[tuple[str, str]] = []  # (temporary, final)

    def path(self, final) -> str:
        """A temporary path beside `final` (same folder and suffix) to write to; renamed to `final` on commit."""
        final = os.fspath(final)
        folder, base = os.path.split(os.path.abspath(final))
        suffix = os.path.splitext(base)[1]  # kept last: np.savez appends ".npz" to a name without it
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{suffix}", dir=folder)
        try:
            # mkstemp makes the file owner-only: give it the mode the final file has (a new one: 0666 less umask)
            os.fchmod(fd, _mode_of(final))
        finally:
            os.close(fd)
        self._pending.append((tmp, final))
        return tmp

    def write_text(self, final, text: str) -> None:
        with open(self.path(final), "w", encoding="utf-8") as fh:
            fh.write(text)

    def commit(self) -> list[str]:
        """Rename every staged file into place; returns the final paths."""
        done = []
        try:
            for tmp, final in self._pending:
                os.replace(tmp, final)
                done.append(final)
        except OSError as err:
            self._pending = self._pending[len(done):]
            self.abort()
            raise OSError(err.errno, f"cannot write {final!r} ({err.strerror}); "
                                     f"written before it: {', '.join(map(repr, done)) or 'none'}") from None
        self._pending = []
        return done

    def abort(self) -> None:
        """Remove every staged file; the final paths are left as they were."""
        for tmp, _ in self._pending:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._pending = []

    def __enter__(self) -> "OutputFiles":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_text(path, text: str) -> None:
    """Write one text file atomically."""
    with OutputFiles() as out:
        out.write_text(path, text)
