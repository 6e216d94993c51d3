"""A run's output folder: when it holds a run, who may write it, and when an old run's
files give way to a new one's.

The rules (docs/RELIABILITY.md):

- A folder that holds a run (a checkpoint, weights or epoch metrics) is written only by
  continuing that run (``resume`` pointing into it, or ``resume: auto``) or with
  ``overwrite``; otherwise training is refused before anything is built. A ``last.pt``
  that is a link continues from the file it names; checkpoints replace links (an atomic
  rename), never write through them.
- Nothing of an existing run changes before the new run may replace it: ``config.yaml`` is
  written once a resume's checks passed (or at the start of a fresh run in an empty folder),
  and with ``overwrite`` the old run's files stay as they were until the new run's first
  checkpoint is written, then go.
- One writer per folder: rank 0 holds :class:`cait.files.FolderLock` for the whole run,
  and temporary files left by a writer killed mid-write are removed when the next one
  starts.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import yaml

from cait.files import FolderLock, atomic_write, remove_stale_temporaries
from cait.training.checkpoint import BEST, EMA_WEIGHTS, LAST, WEIGHTS
from cait.training.config import TrainConfig
from cait.training.records import METRICS, RECORDS

__all__ = ["FolderAtStart", "RunFolder"]

logger = logging.getLogger(__name__)

_CONFIG = "config.yaml"
# ``resume: auto``: continue the output folder's run when it has one, else start fresh
_AUTO = "auto"
# What makes a folder hold a run: something that took training to make.
_RUN_MARKERS = (LAST, BEST, WEIGHTS, EMA_WEIGHTS, METRICS)
# Everything a run writes at the top of its folder, removed when another run replaces it.
_RUN_OUTPUTS = tuple(dict.fromkeys((*_RUN_MARKERS, _CONFIG, *RECORDS)))


def _run_files(folder: Path) -> list[str]:
    """The files in ``folder`` that show it holds a run (an empty metrics file does not)."""
    found = []
    for name in _RUN_MARKERS:
        path = folder / name
        if path.is_file() and (name != METRICS or path.stat().st_size > 0):
            found.append(name)
    return found


def _resolve_resume(resume: str | None, output: Path, held: list[str]) -> str | None:
    """``resume`` as a checkpoint path: ``auto`` becomes the output folder's ``last.pt``
    when it has one, or None (a fresh start) when the folder holds no run (``held``)."""
    if resume != _AUTO:
        return resume
    last = output / LAST
    if last.is_file():
        return str(last)
    if held:
        raise ValueError(
            f"resume=auto: {output} holds a run ({', '.join(held)}) but no {LAST} to "
            "continue from; start it over with overwrite (--overwrite)"
        )
    return None


class RunFolder:
    """Rank 0's hold on the output folder for a whole run: the lock, the config written
    when it is safe to, and the replacement of an old run's files.

    :meth:`acquire` takes the lock; then :meth:`prepare` decides, holding it, what the run
    may do with the folder (resolving ``resume: auto``, refusing a run it may not replace).
    Call :meth:`begin` once a resume's checks passed; it writes ``config.yaml`` unless an
    old run is being replaced, in which case :meth:`checkpoint_written` (called after every
    checkpoint) does that after the first. :meth:`release` gives the lock back.
    """

    def __init__(self, output: str | Path) -> None:
        self.out = Path(output)
        self.config: TrainConfig | None = None
        self.replacing = False
        self._lock = FolderLock(self.out, what="cait train")
        self._begun = False

    def acquire(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output {self.out} is a file, not a folder")
        try:
            self._lock.acquire()
        except PermissionError as err:
            raise PermissionError(f"cannot write to {self.out}: permission denied") from err
        for path in remove_stale_temporaries(self.out):
            logger.info("removed %s, left by a process killed while writing it", path.name)

    def prepare(self, config: TrainConfig) -> TrainConfig:
        """``config`` with ``resume: auto`` resolved, once the folder is known to be
        writable by it: a folder holding a run that this run neither continues nor was
        allowed to replace (``overwrite``) is refused."""
        held = _run_files(self.out)
        resume = _resolve_resume(config.resume, self.out, held)
        # an old run is replaced only with overwrite, and only when not continuing it
        self.replacing = bool(held) and not _continues(resume, self.out)
        if self.replacing and not config.overwrite:
            raise ValueError(
                f"{self.out} already holds a run ({', '.join(held)}): continue it with "
                f"--resume auto (or resume={self.out / LAST}), or replace it with "
                "--overwrite (its files go once the new run's first checkpoint is written)"
            )
        self.config = dataclasses.replace(config, resume=resume)
        if self.replacing:
            logger.warning(
                "overwrite: %s holds a run; its files stay until this run's first checkpoint",
                self.out,
            )
        return self.config

    def release(self) -> None:
        self._lock.release()

    def begin(self) -> None:
        """The run may touch its folder: write ``config.yaml`` (deferred when replacing)."""
        if not self.replacing:
            self._write_config()

    def checkpoint_written(self, written: Iterable[str]) -> None:
        """After each checkpoint: at the first one of a replacing run, remove the old run's
        files (except ``written``, the new run's own) and write ``config.yaml``."""
        if not self.replacing or self._begun:
            return
        keep = set(written)
        for name in _RUN_OUTPUTS:
            path = self.out / name
            if name in keep or not (path.exists() or path.is_symlink()):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        logger.info("replaced the previous run in %s", self.out)
        self._write_config()

    @property
    def begun(self) -> bool:
        """Whether the run's records may be written (after :meth:`begin`, or the first
        checkpoint of a replacing run)."""
        return self._begun

    def _write_config(self) -> None:
        # as a recipe it must start a run, not continue or replace this one
        settings = {**self.config.to_dict(), "resume": None, "overwrite": False}
        text = yaml.safe_dump(settings, sort_keys=False)
        atomic_write(self.out / _CONFIG, lambda tmp: tmp.write_text(text))
        self._begun = True


def _continues(resume: str | None, output: Path) -> bool:
    """Whether ``resume`` is a checkpoint of the run in ``output``: a file in ``output``
    (``resume: auto``'s ``last.pt`` even when it is a link to a file elsewhere: the run
    continues from what it names, and its next checkpoint replaces the link, leaving the
    file it named as it was), or a path that leads to one."""
    if resume is None:
        return False
    path, here = Path(resume), output.resolve()
    return path.parent.resolve() == here or path.resolve().parent == here


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is, as far as a checkpoint's atomic rename changes it (device,
    inode, modification time); None when there is none."""
    try:
        st = path.stat()
    except OSError:  # none, or an output that is no folder (the run reports that)
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


@dataclasses.dataclass(frozen=True)
class FolderAtStart:
    """The output folder's ``last.pt`` as a run found it, to say what the folder holds
    once the run is interrupted (on every rank: each reads the folder itself)."""

    out: Path
    overwrite: bool
    last: tuple[int, int, int] | None  # last.pt's identity before the run

    @classmethod
    def of(cls, config: TrainConfig) -> FolderAtStart:
        out = Path(config.output)
        return cls(out, config.overwrite, _file_identity(out / LAST))

    def after_interrupt(self) -> str:
        """What the folder holds now, and how to continue the run when it can be."""
        last = self.out / LAST
        now = _file_identity(last)
        if now is None:
            return f"no checkpoint was written yet, so {self.out} holds none"
        if now == self.last and self.overwrite:
            # an earlier run's last.pt, kept until this run's first checkpoint (RunFolder):
            # resuming it would continue the run that overwrite was to replace
            return (
                f"this run wrote no checkpoint, so {self.out} holds the earlier run, "
                "left as it was (nothing replaced)"
            )
        return f"{last} holds the run's last checkpoint: continue with --resume auto"
