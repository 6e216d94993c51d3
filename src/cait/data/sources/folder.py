"""A folder tree: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (ImageFolder), or for
``cait eval`` a folder of class folders.

Folders are outside input, read by these rules (docs/TRAINING.md, "How data folders are
read"): entries whose name starts with ``.`` are ignored at every level; symbolic links to
folders and files are followed, a linked folder that leads back to one already walked (a
loop) is skipped; a class with no readable image, and a file that is both in ``train/`` and
in ``val/`` once links are resolved, are errors. Unreadable files never crash a run and are
never dropped silently: they are listed in ``skipped`` (found up front) or carried by the
sample that met them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from PIL import Image

from cait.data.decode import EncodedJpeg, open_image
from cait.data.images import IMAGE_EXTENSIONS, UNREADABLE_IMAGE_ERRORS, load_image, read_bytes
from cait.data.sources.base import IndexedSplit, Source, SplitName
from cait.files import first_line

__all__ = [
    "FolderSource",
    "ImageFolderDataset",
    "check_disjoint",
    "class_folders",
    "find_images",
]

logger = logging.getLogger(__name__)

# Folders with at most this many files are decoded once up front, so that every unreadable
# file is found and reported before training; larger ones are checked as they are read.
VERIFY_UP_TO = 20_000


def _hidden(name: str) -> bool:
    """``.DS_Store``, ``.ipynb_checkpoints``, ``._x.jpg`` (macOS), ``.git``: never data."""
    return name.startswith(".")


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder or a link to one; a link that leads nowhere or to itself
    is not (it is kept as a file, if named like an image, and reported when read)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _list_dir(folder: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not _hidden(e.name)), key=lambda e: e.name)
    except PermissionError:
        raise ValueError(f"permission denied: {folder}") from None


def class_folders(root: Path) -> list[str]:
    """The class names under ``root``: its folders (linked ones too), hidden ones left out."""
    return [e.name for e in _list_dir(root) if _is_dir(e)]


def find_images(folder: Path) -> list[Path]:
    """The image files under a class folder, sorted, hidden entries left out.

    Links are followed; a linked folder whose real path was walked already, or that holds
    ``folder`` itself (a link back up, which would loop), is skipped with a warning. A file
    link that leads nowhere is kept, so that reading it reports it.
    """
    real = os.path.realpath(folder)
    walked = {real}
    todo = [(os.fspath(folder), real)]
    files = []
    while todo:
        current, current_real = todo.pop()
        for entry in _list_dir(current):
            if _is_dir(entry):
                # a plain folder's real path is its parent's plus its name: no system call
                sub = (
                    os.path.realpath(entry.path)
                    if entry.is_symlink()
                    else os.path.join(current_real, entry.name)
                )
                if sub in walked or os.path.commonpath([real, sub]) == sub:
                    logger.warning(
                        "%s: skipped, it leads to %s, which this class folder already holds "
                        "or is in (a link loop)",
                        entry.path,
                        sub,
                    )
                    continue
                walked.add(sub)
                todo.append((entry.path, sub))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(entry.path)
    # strings, then paths: sorted part by part, the order of sorting the paths themselves
    return [Path(f) for f in sorted(files, key=lambda f: f.split(os.sep))]


class ImageFolderDataset(IndexedSplit):
    """``root/<class>/<image>`` with unreadable files skipped and reported.

    ``substitute=True`` (training) replaces an unreadable sample by the next readable one, so
    batches keep their size; ``substitute=False`` (evaluation) returns no image for it and
    :func:`collate_samples` leaves it out, so that no image is counted twice.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        substitute: bool = False,
        verify: bool | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        found = class_folders(self.root)
        if classes is None:
            if not found:
                raise ValueError(f"no class folders in {self.root}")
            classes = found
        else:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"{self.root} has class folders not in training: {extra}")
        self.classes = list(classes)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if name not in found:  # evaluation on a subset of the classes
                continue
            files = find_images(folder)
            if not files:
                raise ValueError(f"class folder {folder} has no image files")
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise ValueError(f"no images found under {self.root}")
        # Unreadable files found up front are left out here and listed in ``self.skipped``;
        # those met later (large folders are not verified up front) are reported per sample.
        self.skipped: list[str] = []
        if verify if verify is not None else len(self.samples) <= VERIFY_UP_TO:
            self._verify()
        else:
            logger.info(
                "%s: %d files, not verified up front; unreadable files will be "
                "skipped and reported when met",
                self.root,
                len(self.samples),
            )
            self._check_each_class_reads()
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.substitute = substitute

    def __str__(self) -> str:
        return str(self.root)

    def key(self, index: int) -> str:
        return str(self.samples[index][0])

    def encoded(self) -> Iterator[tuple[str, bytes | str, int]]:
        """Every sample as ``(key, the file's bytes, label)``; a file that cannot be read
        gives the reason instead of its bytes."""
        for path, label in self.samples:
            yield str(path), read_bytes(path), label

    def _no_readable_image(self, label: int, count: int, problem: str) -> ValueError:
        return ValueError(
            f"class folder {self.root / self.classes[label]} has no readable image "
            f"({count} file(s), e.g. {problem})"
        )

    def _verify(self) -> None:
        readable = []
        problems: dict[int, list[str]] = {}
        for path, label in self.samples:
            try:
                load_image(path)
                readable.append((path, label))
            except UNREADABLE_IMAGE_ERRORS as err:
                problems.setdefault(label, []).append(f"{path}: {first_line(err)}")
        kept = {label for _, label in readable}
        for label, listed in problems.items():
            if label not in kept:  # a class of unreadable files would be an empty class
                raise self._no_readable_image(label, len(listed), listed[0])
        self.samples = readable
        self.skipped = [p for listed in problems.values() for p in listed]
        if self.skipped:
            logger.warning(
                "%s: %d unreadable file(s) left out:\n  %s",
                self.root,
                len(self.skipped),
                "\n  ".join(self.skipped),
            )

    def _check_each_class_reads(self) -> None:
        """Decode files of each class until one reads (usually the first), so that a class
        of unreadable files is an error now rather than an empty class in the model."""
        pending = dict.fromkeys((t for _, t in self.samples), 0)
        first_problem: dict[int, str] = {}
        for i, (_, label) in enumerate(self.samples):
            if label not in pending:
                continue
            _, problem = self._read(i)
            if not problem:
                del pending[label]
            else:
                pending[label] += 1
                first_problem.setdefault(label, problem)
            if not pending:
                break
        for label, count in pending.items():
            raise self._no_readable_image(label, count, first_problem[label])

    def _read(self, index: int) -> tuple[Image.Image | None, str]:
        path, _ = self.samples[index]
        try:
            return load_image(path), ""
        except UNREADABLE_IMAGE_ERRORS as err:
            return None, f"{path}: {first_line(err)}"

    def _open(self, index: int) -> Image.Image | EncodedJpeg:
        return open_image(self.samples[index][0])


class FolderSource(Source):
    """``DIR``: an ImageFolder tree with ``train/`` and ``val/``; for evaluation alone,
    ``DIR/val`` or ``DIR`` itself when it holds class folders (neither ``val/`` nor
    ``train/``)."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.root = Path(location).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data path not found: {self.root} (expected a folder, 'digits', or "
                "shards:DIR, hf:DIR, list:FILE)"
            )

    @property
    def single_split(self) -> bool:
        return not (self.root / "train").is_dir()

    def check_splits(self) -> None:
        for split in ("train", "val"):
            _require_split(self.root, split)

    def split(
        self,
        name: SplitName,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        train: bool = False,
    ) -> ImageFolderDataset:
        _require_split(self.root, name)
        return ImageFolderDataset(self.root / name, transform, classes, substitute=train)

    def eval_split(
        self, transform: Callable | None, classes: Sequence[str] | None
    ) -> ImageFolderDataset:
        if (self.root / "train").is_dir():  # a dataset root, whose train/ is not a class
            _require_split(self.root, "val")
        root = self.root / "val" if (self.root / "val").is_dir() else self.root
        return ImageFolderDataset(root, transform, classes=classes, substitute=False)

    def check_disjoint(self, train: ImageFolderDataset, val: ImageFolderDataset) -> None:
        check_disjoint(train, val)


def _require_split(root: Path, split: str) -> None:
    if not (root / split).is_dir():
        raise FileNotFoundError(
            f"{root} has no {split}/ folder (expected {root}/{split}/<class>/<image>)"
        )


def _real_paths(samples: Sequence[tuple[Path, int]]) -> list[str]:
    """Each file's real path (links resolved), resolving each folder once: a file that is
    not itself a link is its folder's real path plus its name."""
    folders: dict[str, str] = {}
    real = []
    for path, _ in samples:
        name = os.fspath(path)
        parent, base = os.path.split(name)
        if parent not in folders:
            folders[parent] = os.path.realpath(parent)
        real.append(
            os.path.realpath(name) if os.path.islink(name) else os.path.join(folders[parent], base)
        )
    return real


def check_disjoint(train: ImageFolderDataset, val: ImageFolderDataset) -> None:
    """Refuse a validation split that shares files with training once links are resolved
    (a linked class folder, a linked file, ``val`` linked to ``train``): its scores would
    be measured on training images."""
    val_files = dict(zip(_real_paths(val.samples), (p for p, _ in val.samples), strict=True))
    shared = [
        (path, val_files[real])
        for (path, _), real in zip(train.samples, _real_paths(train.samples), strict=True)
        if real in val_files
    ]
    if shared:
        path, other = shared[0]
        raise ValueError(
            f"train/ and val/ share {len(shared)} files, e.g. {path} and {other} are the same "
            "file (a symbolic link?): validation would score training images"
        )
