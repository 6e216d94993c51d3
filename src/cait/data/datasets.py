"""The names this module held before the data sources moved to :mod:`cait.data.sources`
(digits, folders), :mod:`cait.data.images` (reading one image) and
:mod:`cait.data.loaders` (batches); kept so that code importing them from here still
works."""

from cait.data.images import (
    IMAGE_EXTENSIONS,
    UNREADABLE_IMAGE_ERRORS,
    UnreadableImage,
    check_image_file,
    load_image,
    read_image,
)
from cait.data.loaders import collate_samples
from cait.data.sources import DIGITS, build_datasets, build_val_dataset
from cait.data.sources.digits import DigitsDataset, export_digits
from cait.data.sources.folder import (
    VERIFY_UP_TO,
    ImageFolderDataset,
    check_disjoint,
    class_folders,
    find_images,
)

__all__ = [
    "DIGITS",
    "IMAGE_EXTENSIONS",
    "UNREADABLE_IMAGE_ERRORS",
    "VERIFY_UP_TO",
    "DigitsDataset",
    "ImageFolderDataset",
    "UnreadableImage",
    "build_datasets",
    "build_val_dataset",
    "check_disjoint",
    "check_image_file",
    "class_folders",
    "collate_samples",
    "export_digits",
    "find_images",
    "load_image",
    "read_image",
]
