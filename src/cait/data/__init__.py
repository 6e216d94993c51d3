"""Images in: the data and augmentation configs, the sources (:mod:`cait.data.sources`),
reading images, transforms, samplers and loaders for training and evaluation."""

from cait.data.config import AugmentConfig, DataConfig
from cait.data.images import UNREADABLE_IMAGE_ERRORS, load_image, read_image
from cait.data.loaders import Loader, collate_keyed, collate_samples, make_loader, take
from cait.data.samplers import (
    RepeatedAugSampler,
    ShardSampler,
    ShuffleSampler,
    build_train_sampler,
)
from cait.data.sources import (
    DIGITS,
    DigitsDataset,
    ImageFolderDataset,
    build_datasets,
    build_val_dataset,
    export_digits,
    open_source,
    open_split,
)
from cait.data.transforms import build_mixup, eval_transform, train_transform

__all__ = [
    "DIGITS",
    "UNREADABLE_IMAGE_ERRORS",
    "AugmentConfig",
    "DataConfig",
    "DigitsDataset",
    "ImageFolderDataset",
    "Loader",
    "RepeatedAugSampler",
    "ShardSampler",
    "ShuffleSampler",
    "build_datasets",
    "build_mixup",
    "build_train_sampler",
    "build_val_dataset",
    "collate_keyed",
    "collate_samples",
    "eval_transform",
    "export_digits",
    "load_image",
    "make_loader",
    "open_source",
    "open_split",
    "read_image",
    "take",
    "train_transform",
]
