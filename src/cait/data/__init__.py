"""Images in: the augmentation config, datasets, transforms and samplers for training and
evaluation."""

from cait.data.config import AugmentConfig
from cait.data.datasets import (
    DIGITS,
    UNREADABLE_IMAGE_ERRORS,
    DigitsDataset,
    ImageFolderDataset,
    build_datasets,
    build_val_dataset,
    collate_samples,
    export_digits,
    load_image,
    read_image,
)
from cait.data.samplers import (
    RepeatedAugSampler,
    ShardSampler,
    ShuffleSampler,
    build_train_sampler,
)
from cait.data.transforms import build_mixup, eval_transform, train_transform

__all__ = [
    "DIGITS",
    "UNREADABLE_IMAGE_ERRORS",
    "AugmentConfig",
    "DigitsDataset",
    "ImageFolderDataset",
    "RepeatedAugSampler",
    "ShardSampler",
    "ShuffleSampler",
    "build_datasets",
    "build_mixup",
    "build_train_sampler",
    "build_val_dataset",
    "collate_samples",
    "eval_transform",
    "export_digits",
    "load_image",
    "read_image",
    "train_transform",
]
