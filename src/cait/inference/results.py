"""A results file written row by row, resumable, and replaced whole at the end.

While a run is going its rows are appended to a journal beside the output,
``.NAME.partial.jsonl``, one JSON line per row, each batch written in one ``write`` and
flushed to disk: a process killed mid-way (SIGKILL, a power cut) leaves at most a torn last
line, which the next run drops. ``resume`` reads the journal's keys and the run skips them,
so no row is written twice and none is lost. At the end the rows are written to the output
in its format (``.csv``, ``.jsonl``, ``.parquet``) by :func:`cait.files.atomic_write`, and
the journal is removed. One process writes an output at a time (:class:`cait.files.OutputLock`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cait.files import OutputLock, atomic_write

__all__ = ["RESULT_FORMATS", "ResultsJournal", "read_rows", "result_format", "write_rows"]

logger = logging.getLogger(__name__)

RESULT_FORMATS = (".csv", ".jsonl", ".parquet")


def result_format(path: str | os.PathLike[str]) -> str:
    """The format of a results file, from its extension; a one-line error for another."""
    suffix = Path(path).suffix.lower()
    if suffix not in RESULT_FORMATS:
        raise ValueError(
            f"{path}: a results file ends in {', '.join(RESULT_FORMATS)}, not {suffix or '(none)'}"
        )
    return suffix


def write_rows(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` (dicts with the same keys, in order) to ``path`` in its format,
    atomically."""
    fmt = result_format(path)
    columns = list(rows[0]) if rows else []

    def write(tmp: Path) -> None:
        if fmt == ".parquet":
            import pyarrow as pa  # optional, and slow to import: only for parquet
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
        elif fmt == ".csv":
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        else:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    return atomic_write(path, write)


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a results file :func:`write_rows` wrote (CSV values come back as text)."""
    fmt = result_format(path)
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, newline="") as f:
        if fmt == ".csv":
            return list(csv.DictReader(f))
        return [json.loads(line) for line in f if line.strip()]


class ResultsJournal:
    """The rows of one run into ``output``, keyed by ``key`` (see the module docstring).

    Use it as a context manager (it holds the output's lock): ``done`` holds the keys of
    the rows already written, ``append`` adds a batch of rows, ``finish`` writes the output.
    Without ``resume``, an output or a journal already there is refused unless
    ``overwrite``.
    """

    def __init__(
        self,
        output: str | os.PathLike[str],
        key: str = "path",
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        result_format(output)
        self.output = Path(output)
        self.journal = self.output.with_name(f".{self.output.name}.partial.jsonl")
        self.key, self.resume, self.overwrite = key, resume, overwrite
        self.lock = OutputLock(self.output, "cait predict")
        self.done: set[str] = set()
        self._file: Any = None

    def __enter__(self) -> ResultsJournal:
        self.lock.acquire()
        try:
            self._open()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
        self.lock.release()

    def _open(self) -> None:
        if not self.resume and not self.overwrite:
            if self.journal.exists():
                raise ValueError(
                    f"{self.output}: a stopped run left its rows in {self.journal}: "
                    "--resume continues it, --force starts over"
                )
            if self.output.exists():
                raise ValueError(f"{self.output} exists: --force replaces it")
        if not self.resume:
            self.journal.unlink(missing_ok=True)
        elif not self.journal.exists() and self.output.exists():
            # a finished run resumed (new images added): its rows start the journal
            self._write_lines(read_rows(self.output), create=True)
        rows = self._read_journal()
        self.done = {str(row[self.key]) for row in rows}
        if self.resume:
            logger.info("resuming %s: %d rows already written", self.output, len(self.done))
        self._file = open(self.journal, "a")

    def _read_journal(self) -> list[dict[str, Any]]:
        """The journal's whole rows; a torn last line (a process killed mid-write) is cut."""
        if not self.journal.exists():
            return []
        data = self.journal.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            logger.warning("%s: dropped a torn last row (a process killed mid-write)", self.journal)
            with open(self.journal, "r+b") as f:
                f.truncate(len(whole))
        return [json.loads(line) for line in whole.decode().splitlines() if line.strip()]

    def _write_lines(self, rows: Iterable[dict[str, Any]], create: bool = False) -> None:
        text = "".join(json.dumps(row) + "\n" for row in rows)
        f = open(self.journal, "w") if create else self._file
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        finally:
            if create:
                f.close()

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add rows (each batch in one write, flushed to disk)."""
        fresh = [row for row in rows if str(row[self.key]) not in self.done]
        self._write_lines(fresh)
        self.done.update(str(row[self.key]) for row in fresh)

    def finish(self) -> list[dict[str, Any]]:
        """Write every row to the output in its format; remove the journal."""
        self._file.close()
        self._file = None
        rows = self._read_journal()
        write_rows(self.output, rows)
        self.journal.unlink()
        return rows
