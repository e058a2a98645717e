"""Claiming an output directory, the overwrite policy, and build-then-swap.

Every command that writes a directory (a merge through ``run_merge``, ``export`` to a
directory, ``analyze --out``, ``demo --out``) uses :class:`OutputDirectory`:

1. **Claim.** A missing directory is created with ``mkdir`` (atomic), then a claim file
   :data:`CLAIM_FILE` is created inside it with ``O_EXCL``. Only one run can hold a
   claim, so two runs into the same directory never both proceed: the second is
   refused, naming the first (pid, host, start time). A claim left by a run that died is
   taken over (one line on stderr says so) only where it cannot hide anything: the
   directory holds nothing but the claim, the claim names this host, and no process
   with its pid is running (:func:`_take_over`); otherwise it is refused, naming it.
2. **Policy.** A directory that is missing or empty is written in place. An existing
   non-empty one is replaced only if the command recognises it as its own earlier
   output (``policy.recognises``: a merge's ``mergekit_config.yml``, a report's marker,
   a store's files) and, where the policy names a flag (``--force``), the flag was
   given; anything else is refused with the flag or environment variable named.
   ``in_place`` (a merge's ``MERGEKIT_OTA_ALLOW_OVERWRITE=1``) writes into any existing
   directory as mergekit itself does.
3. **Build, then swap.** A replacement is built beside the old directory (in
   ``.<name>.mergekit-ota-<random>/<name>``, so the new output has its final base name
   while it is written) and swapped in at :meth:`~OutputDirectory.commit` with one
   atomic ``renameat2(RENAME_EXCHANGE)`` where the system has it (two renames
   otherwise), so a failure leaves the old output or the new one, never a mix.
4. **Clean-up.** A run that fails before :meth:`~OutputDirectory.commit` removes only what
   it created: the directory it made, the entries it added to an empty directory (or,
   in place, to a non-empty one), or its build directory; then its claim.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, FrozenSet, NamedTuple, Optional

from mergekit_ota.errors import OTAError, OutputError

CLAIM_FILE = ".mergekit-ota-claim"


@dataclass(frozen=True)
class ReplacePolicy:
    """Which existing non-empty directory a command may replace, and how the user allows it.

    ``recognises(path)`` says whether ``path`` is this command's own earlier output
    (``what`` describes it in messages); ``flag`` is what the user passes to allow a
    replacement (``None``: a recognised directory is replaced without asking, as
    mergekit re-runs into its own output); ``in_place_hint`` names the way (if any) to
    write into a directory that is not recognised. ``resumable``: the command writes every file of a recognised
    directory whole and a rerun resumes from them, so the claim of a run that is no longer running (killed) is
    taken over even when the directory holds files (otherwise only when it holds nothing else).
    """

    what: str
    recognises: Callable[[str], bool]
    flag: Optional[str] = None
    in_place_hint: Optional[str] = None
    resumable: bool = False


def _entries(path: str) -> FrozenSet[str]:
    return frozenset(name for name in os.listdir(path) if name != CLAIM_FILE)


def _claim_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})


class ClaimOwner(NamedTuple):
    """The run a claim file names."""

    pid: int
    host: str
    started: str

    @classmethod
    def parse(cls, text: str) -> Optional["ClaimOwner"]:
        """The owner :func:`_claim_text` wrote, or ``None`` for anything else."""
        from mergekit_ota.io.safetensors import parse_json

        try:
            owner = parse_json(text.encode("utf-8", "surrogatepass"), "claim", "claim file")
            return cls(int(owner["pid"]), str(owner["host"]), str(owner["started"]))
        except (OTAError, ValueError, KeyError, TypeError):
            return None

    @property
    def dead(self) -> bool:
        """Whether the claim names this host and no process with its pid runs here (a run that was killed)."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # PermissionError: a process of another user has that pid
            return False
        return False


def _read_claim(path: str) -> Optional[ClaimOwner]:
    try:
        with open(os.path.join(path, CLAIM_FILE), "r", encoding="utf-8") as fp:
            return ClaimOwner.parse(fp.read())
    except OSError:
        return None


def _describe_claim(path: str) -> str:
    claim = os.path.join(path, CLAIM_FILE)
    owner = _read_claim(path)
    if owner is None:
        return f"another mergekit-ota run is writing {path} (it holds {claim})"
    if owner.dead:
        return (
            f"{path} holds the claim of a mergekit-ota run that is no longer running (pid {owner.pid}, started "
            f"{owner.started}) and files it may have left incomplete: delete {claim} (or the directory) to write there"
        )
    return (
        f"another mergekit-ota run (pid {owner.pid} on {owner.host}, started {owner.started}) is writing {path}; "
        "wait for it or choose another directory"
    )


def _take_over(path: str, resumable: bool = False) -> Optional[ClaimOwner]:
    """Make the claim in ``path`` ours if it is a dead run's and the directory holds nothing else (or
    ``resumable``: :attr:`ReplacePolicy.resumable`); return its former owner, or ``None`` (nothing changed) if it
    may not be taken.

    The claim file is rewritten in place under an exclusive ``flock``, after reading it again under the lock
    and checking that it is still the file at that path, so two runs taking over at once cannot both win: the
    second then reads the first's live claim. Without ``fcntl`` (not POSIX) nothing is taken over.
    """
    try:
        import fcntl
    except ImportError:
        return None
    claim = os.path.join(path, CLAIM_FILE)
    try:
        fd = os.open(claim, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held, there = os.fstat(fd), os.stat(claim, follow_symlinks=False)
        if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
            return None  # released (and maybe claimed anew) while we waited for the lock
        owner = ClaimOwner.parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        if owner is None or not owner.dead or (_entries(path) and not resumable):
            return None
        text = _claim_text().encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the lock
    print(
        f"mergekit-ota: {path}: taking over the claim of a run that is no longer running (pid {owner.pid} on "
        f"{owner.host}, started {owner.started}); "
        + ("resuming from what it finished" if _entries(path) else "the directory held nothing else"),
        file=sys.stderr,
    )
    return owner


def _stale_and_alone(path: str, resumable: bool = False) -> bool:
    """Whether the claim in ``path`` is a dead run's and the directory holds nothing else, or ``resumable``
    (:func:`_take_over` would take it)."""
    owner = _read_claim(path)
    return owner is not None and owner.dead and (resumable or not _entries(path))


def _exchange(a: str, b: str) -> bool:
    """Atomically swap paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _swap(a: str, b: str) -> None:
    """Exchange directories ``a`` and ``b``: atomically where the system allows, else by three renames."""
    if _exchange(a, b):
        return
    spare = a + ".swap"
    os.rename(b, spare)
    os.rename(a, b)
    os.rename(spare, a)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


class OutputDirectory:
    """``with OutputDirectory(path, policy) as out:`` write under ``out.build``, then ``out.commit()``.

    Leaving the block without :meth:`commit` (an error, or ``return``) undoes what
    this run created (see the module docstring). :attr:`mode` is ``new``, ``empty``,
    ``replace`` or ``in_place``.
    """

    def __init__(
        self, path: str, policy: ReplacePolicy, *, force: bool = False, in_place: bool = False, swap_first: bool = False
    ):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.swap_first = swap_first
        self.policy = policy
        self.force = force
        self.in_place = in_place
        self.mode = ""
        self.build = self.path
        self._before: FrozenSet[str] = frozenset()
        self._stage: Optional[str] = None
        self._claimed = False
        self._done = False
        self._made_parent: Optional[str] = None

    # -- claiming --------------------------------------------------------------
    def _refusal(self) -> OutputError:
        if self.policy.recognises(self.path):
            return OutputError(
                f"{self.path} holds {self.policy.what}; pass {self.policy.flag} to replace it "
                f"(the new output is built beside it and swapped in only when complete)"
            )
        hint = f", or {self.policy.in_place_hint}" if self.policy.in_place_hint else ""
        entries = sorted(_entries(self.path))
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        return OutputError(
            f"{self.path} already exists and is not empty (it holds {shown}), and it is not {self.policy.what}; "
            f"it will not be replaced or written into. Choose a new directory{hint}"
        )

    def _allowed_mode(self) -> str:
        """The mode for ``self.path`` as it is now; raises if it may not be written."""
        if not os.path.isdir(self.path) or os.path.islink(self.path):
            raise OutputError(f"{self.path} exists and is not a directory; choose a new directory")
        if os.path.lexists(os.path.join(self.path, CLAIM_FILE)) and not _stale_and_alone(self.path, self._resumable):
            raise OutputError(_describe_claim(self.path))
        return self._mode_for_contents()

    @property
    def _resumable(self) -> bool:
        """Whether a dead run's claim here may be taken over although the directory holds files."""
        return self.policy.resumable and os.path.isdir(self.path) and self.policy.recognises(self.path)

    def _mode_for_contents(self) -> str:
        """``empty``, ``in_place`` or ``replace`` for what the directory holds (besides a claim); else refuse."""
        if not _entries(self.path):
            return "empty"
        if self.in_place:
            return "in_place"
        if self.policy.recognises(self.path) and (self.policy.flag is None or self.force):
            return "replace"
        raise self._refusal()

    def check(self) -> None:
        """Raise :class:`OutputError` now if this output may not be written; nothing is created or claimed."""
        if os.path.lexists(self.path):
            self._allowed_mode()

    def _claim(self) -> None:
        claim = os.path.join(self.path, CLAIM_FILE)
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _take_over(self.path, self._resumable) is None:
                raise OutputError(_describe_claim(self.path)) from None
            self._claimed = True
            return
        except OSError as error:
            raise OutputError(f"{self.path}: cannot claim the directory for writing ({error.strerror})") from error
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            fp.write(_claim_text())
        self._claimed = True

    def __enter__(self) -> "OutputDirectory":
        parent = os.path.dirname(self.path)
        missing = parent
        while not os.path.exists(os.path.dirname(missing)) and os.path.dirname(missing) != missing:
            missing = os.path.dirname(missing)
        self._made_parent = None if os.path.exists(parent) else missing  # the top parent this run creates
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(self.path)
            self.mode = "new"
        except FileExistsError:
            self.mode = self._allowed_mode()  # refuses without touching the directory
        except OSError as error:
            raise OutputError(f"{self.path}: cannot create the directory ({error.strerror})") from error
        try:
            self._claim()
            if self.mode != "new":
                # another run may have claimed and released it between the look and the claim
                self.mode = self._mode_for_contents()
            self._before = _entries(self.path)
            if self.mode == "replace":
                self._stage = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.mergekit-ota-", dir=parent)
                self.build = os.path.join(self._stage, os.path.basename(self.path))
                os.mkdir(self.build)
                if self.swap_first:
                    self._swap_old_out()
            _complete.discard(os.path.abspath(self.build))  # a mark left by an earlier run into the same path
        except BaseException:
            self._undo()
            raise
        return self

    def _swap_old_out(self) -> None:
        """``swap_first``: move the old output into the stage now and build at its place (for outputs whose
        files name their own paths); a failure swaps it back, :meth:`commit` deletes it."""
        assert self._stage is not None
        with open(os.path.join(self.build, CLAIM_FILE), "w", encoding="utf-8") as fp:
            fp.write(_claim_text())
        _swap(self.build, self.path)  # path: the empty build (claimed); build's name: the old output
        self.build = self.path

    def _old(self) -> str:
        assert self._stage is not None
        return os.path.join(self._stage, os.path.basename(self.path))

    # -- finishing -------------------------------------------------------------
    def commit(self) -> None:
        """Make the build the output: swap it in (``replace``), then release the claim."""
        if self._done:
            return
        if self.mode == "replace" and self.swap_first:
            self._release()
            shutil.rmtree(self._stage or "", ignore_errors=True)  # the old output, with our claim in it
            self._stage = None
        elif self.mode == "replace":
            assert self._stage is not None
            _swap(self.build, self.path)  # the old output is now at the build's name
            shutil.rmtree(self._stage, ignore_errors=True)  # the old output, with our claim in it
            self._stage = None
        else:
            self._release()
        self._done = True

    def _release(self) -> None:
        if self._claimed:
            try:
                os.remove(os.path.join(self.path, CLAIM_FILE))
            except FileNotFoundError:
                pass
            self._claimed = False

    def _undo(self) -> None:
        """Remove what this run created; never raises."""
        try:
            if self._stage is not None and self.swap_first and self.build == self.path:
                _swap(self._old(), self.path)  # the old output back; the failed build into the stage
                os.remove(os.path.join(self.path, CLAIM_FILE))
                self._claimed = False
            if self._stage is not None:
                shutil.rmtree(self._stage, ignore_errors=True)
                self._stage = None
            if not self._claimed:
                return
            if self.mode == "new":
                shutil.rmtree(self.path, ignore_errors=True)
                self._claimed = False
                self._remove_made_parents()
                return
            if self.mode in ("empty", "in_place") and os.path.isdir(self.path):
                for name in _entries(self.path) - self._before:
                    _remove(os.path.join(self.path, name))
            self._release()
        except OSError:
            pass

    def _remove_made_parents(self) -> None:
        """Remove the parent directories this run created for a new output, where they stayed empty."""
        if self._made_parent is None:
            return
        directory = os.path.dirname(self.path)
        while True:
            try:
                os.rmdir(directory)
            except OSError:
                return
            if directory == self._made_parent:
                return
            directory = os.path.dirname(directory)

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if not self._done:
            self._undo()
            self._done = True

    @property
    def complete(self) -> bool:
        """Whether the run marked its build complete (:func:`mark_complete`), e.g. every weight written."""
        return os.path.abspath(self.build) in _complete


_complete: set = set()


def mark_complete(build: str) -> None:
    """Record that the essential part of the output being built at ``build`` is finished.

    A merge marks its build when mergekit has written every tensor and the index: a
    failure after that (model card, tokenizer, tag-along files) keeps the output.
    """
    _complete.add(os.path.abspath(build))
