"""Datasets and loaders: Fashion-MNIST (IDX files) and ImageFolder trees (timm's transforms, with
augmentation defaults that follow the input size).

Training augmentation is a pure function of ``(seed, epoch, image index)``: every sample is drawn
with its own seeded RNG, so a run resumed mid-epoch sees exactly the images and crops the
uninterrupted run would have seen, whatever the number of loader workers.
"""
from __future__ import annotations

import gzip
import itertools
import os
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, get_worker_info

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
SUBSET_SEED = 20240601  # subsets are the same for every --seed, so seeds differ only in training


class DataError(RuntimeError):
    """The dataset is missing, cannot be fetched, or does not fit the options."""


# ----------------------------------------------------------------------------------- Fashion-MNIST
def _find_idx(folder: str, name: str) -> Optional[str]:
    """``name`` (.gz or not) in ``folder`` or in torchvision's ``folder/FashionMNIST/raw``."""
    for sub in ("", os.path.join("FashionMNIST", "raw")):
        for candidate in (name + ".gz", name):
            path = os.path.join(folder, sub, candidate)
            if os.path.isfile(path):
                return path
    return None


def find_fashion_mnist(data_dir: Optional[str]) -> Optional[str]:
    """The first folder holding all four IDX files: ``data_dir``, then the Debian package's."""
    for folder in ([data_dir] if data_dir else []) + [FASHION_MNIST_SYSTEM_DIR]:
        if all(_find_idx(folder, n) for pair in FASHION_MNIST_FILES.values() for n in pair):
            return folder
    return None


def download_fashion_mnist(root: str) -> str:
    """Fetch the IDX files through torchvision into ``root``; a clear error when that fails."""
    from torchvision.datasets import FashionMNIST
    try:
        for train in (True, False):
            FashionMNIST(root, train=train, download=True)
    except Exception as err:  # no network, proxy, disk ...: all end in the same advice
        raise DataError(
            f"Fashion-MNIST was not found in --data-dir or {FASHION_MNIST_SYSTEM_DIR}, and downloading "
            f"it into {root} failed ({type(err).__name__}: {err}). Get it with "
            "'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four files "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz into a folder and pass it as --data-dir") from err
    return root


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip or plain) as a numpy array: uint8 images (N, H, W) or labels (N,)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, ndim = int.from_bytes(data[0:4], "big"), data[3]
    if magic not in (2049, 2051):
        raise ValueError(f"{path} is not an IDX label/image file (magic number {magic})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {shape}, found {array.size} values")
    return array.reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST in memory; ``train=True`` adds a random shift of up to 2 pixels and a
    horizontal flip with probability ``hflip`` (clothes, shoes and bags look alike mirrored, so the
    flip keeps the label; 0.5 by default), drawn from torch's global RNG only."""

    rngs = ("torch",)

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")

    def __init__(self, folder: str, split: str, img_size: int = 28, train: bool = False,
                 hflip: float = 0.5):
        images, labels = (read_idx(_find_idx(folder, n)) for n in FASHION_MNIST_FILES[split])
        self.images = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.img_size, self.train, self.hflip = img_size, train, hflip

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = self.images[index].unsqueeze(0).float().div_(255)
        if self.train:
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(F.pad(x, (2, 2, 2, 2)), (dy, dx), (1, 2))[:, 2:-2, 2:-2]
            if self.hflip > 0 and torch.rand(()) < self.hflip:
                x = x.flip(2)
        if self.img_size != x.shape[-1]:
            x = F.interpolate(x[None], size=self.img_size, mode="bilinear", align_corners=False)[0]
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, int(self.targets[index])


# ------------------------------------------------------------------------------------- ImageFolder
SMALL_INPUT = 64  # at or below this size the ImageFolder augmentation is the small-image one


def imagefolder_classes(root: str) -> List[str]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"{root} has no class subfolders (ImageFolder layout: "
                        f"{root}/<class>/<image>)")
    return classes


def _has_image(folder: str, limit: int = 64) -> bool:
    """Whether one of the first ``limit`` entries of ``folder`` is an image file."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    try:
        with os.scandir(folder) as entries:
            return any(e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file()
                       for e in itertools.islice(entries, limit))
    except OSError:
        return False


def _subfolders(folder: str, limit: int = 64) -> List[str]:
    """The folders among the first ``limit`` entries of ``folder``."""
    try:
        with os.scandir(folder) as entries:
            return [e.path for e in itertools.islice(entries, limit) if e.is_dir()]
    except OSError:
        return []


def looks_like_imagefolder(folder: str) -> bool:
    """Whether ``folder`` holds class folders of images, or split folders of those."""
    return any(_has_image(sub) or any(_has_image(c) for c in _subfolders(sub))
               for sub in _subfolders(folder))


def read_image(path: str):
    """torchvision's image loader (PIL, RGB); an unreadable file raises a DataError naming it."""
    from torchvision.datasets.folder import default_loader
    try:
        return default_loader(path)
    except Exception as err:
        raise DataError(f"cannot read image {path} ({type(err).__name__}: {err}); remove or "
                        "replace the file") from err


def image_folder(root: str, transform) -> Dataset:
    """torchvision's ImageFolder over ``root`` with :func:`read_image`; an empty class folder is a
    DataError that names it."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS
    try:
        return ImageFolder(root, transform, loader=read_image)
    except FileNotFoundError as err:
        empty = [c for c in imagefolder_classes(root)
                 if not _has_image(os.path.join(root, c), limit=10 ** 9)]
        raise DataError(f"{root}: the class folder(s) {', '.join(empty) or '?'} hold no images "
                        f"({' '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)") from err


def imagefolder_train_transform(args, cfg: dict):
    """timm's training transform with defaults that follow the input size (``--scale``,
    ``--ratio``, ``--hflip``, ``--color-jitter`` override them; ``--aa``, ``--reprob`` as timm).

    Above ``SMALL_INPUT`` pixels: timm's ImageNet augmentation (random resized crops of 8-100% of
    the image, aspect 3/4-4/3, horizontal flips, color jitter 0.4). At ``SMALL_INPUT`` or less
    (digits, CIFAR-like images) a resized crop of 8% keeps a few pixels of a 28x28 image, so
    instead the image gets the evaluation resize and crop, is padded by size/8 pixels and cropped
    back at a random place (the CIFAR recipe: a shift, no rescaling), with no flip (a mirrored
    digit or letter is another symbol; pass ``--hflip 0.5`` for natural images) and no color jitter.
    ``--scale`` or ``--ratio`` ask for timm's random resized crop at any size."""
    from timm.data import create_transform
    from timm.data.transforms import str_to_interp_mode
    from torchvision import transforms as T
    size = cfg["input_size"][-1]
    small = size <= SMALL_INPUT and args.scale is None and args.ratio is None
    hflip = args.hflip if args.hflip is not None else (0.0 if small else 0.5)
    jitter = args.color_jitter if args.color_jitter is not None else (0.0 if small else 0.4)
    options = dict(is_training=True, scale=args.scale, ratio=args.ratio, hflip=hflip,
                   color_jitter=jitter or None, auto_augment=args.aa, re_prob=args.reprob)
    if args.no_aug:
        return create_transform(**cfg, is_training=True, no_aug=True)
    if not small:
        return create_transform(**cfg, **options)
    _, secondary, final = create_transform(**cfg, **options, separate=True)
    interpolation = str_to_interp_mode(cfg["interpolation"])
    primary = [T.Resize(int(size / cfg["crop_pct"]), interpolation), T.CenterCrop(size),
               T.RandomCrop(size, padding=max(1, size // 8))]
    if hflip > 0:
        primary.append(T.RandomHorizontalFlip(hflip))
    return T.Compose([*primary, secondary, final])


# ------------------------------------------------------------------------------ seeding, sampling
class SeededSamples(Dataset):
    """Wraps a training dataset: item ``(epoch, index)`` is loaded with the global RNGs it draws
    from (``rngs``: any of torch, random, numpy) seeded from ``(seed, epoch, index)``. In the main
    process the RNG states are restored afterwards, so training draws the same numbers with or
    without loader workers."""

    def __init__(self, dataset: Dataset, seed: int, rngs: Sequence[str] = ("torch", "random", "numpy")):
        self.dataset, self.seed, self.rngs = dataset, seed, tuple(rngs)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        sample_seed = hash((self.seed, epoch, index)) % (2 ** 32)
        restore = get_worker_info() is None
        saved = {name: _RNGS[name][0]() for name in self.rngs} if restore else {}
        for name in self.rngs:
            _RNGS[name][2](sample_seed)
        try:
            return self.dataset[index]
        finally:
            for name, state in saved.items():
                _RNGS[name][1](state)


# name: (get state, set state, seed); torch's CPU generator only (data loading never uses CUDA).
_RNGS = {"torch": (torch.get_rng_state, torch.set_rng_state, torch.default_generator.manual_seed),
         "random": (random.getstate, random.setstate, random.seed),
         "numpy": (np.random.get_state, np.random.set_state, np.random.seed)}


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed and epoch) that yields ``(epoch, index)`` and can
    start ``start`` samples into the epoch, for an exact mid-epoch resume."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.start, None):
            yield self.epoch, index

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Rank ``r`` of ``w`` gets indices ``r, r+w, ...``: no padding, so summed metrics are exact."""

    def __init__(self, length: int, num_replicas: int, rank: int):
        self.indices = range(rank, length, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def fixed_subset(dataset: Dataset, size: Optional[int]) -> Dataset:
    """A random subset of ``size`` items, the same in every run (``None``: the whole dataset)."""
    if size is None or size >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(SUBSET_SEED)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:size].sort().values.tolist())


def holdout_split(length: int, holdout: int) -> Tuple[List[int], List[int]]:
    """``(held out, rest)``: sorted indices of a fixed random ``holdout``-image subset of a split of
    ``length`` images (seeded with ``SUBSET_SEED``, so the same for every ``--seed``) and of the rest."""
    if not 1 <= holdout < length:
        raise DataError(f"--val-holdout {holdout}: the training split has {length} images; hold out "
                        "at least 1 and fewer than all of them")
    order = torch.randperm(length, generator=torch.Generator().manual_seed(SUBSET_SEED))
    return order[:holdout].sort().values.tolist(), order[holdout:].sort().values.tolist()


# ------------------------------------------------------------------------------------------ build
@dataclass
class DataInfo:
    """What the model needs to know before it is built."""

    num_classes: int
    in_chans: int
    img_size: Optional[int]  # None: take it from the model's config (ImageFolder)
    fashion_dir: Optional[str] = None
    classes: Optional[List[str]] = None  # ImageFolder: the class folders every split must hold


def uses_holdout(args) -> bool:
    """True when validation during training runs on images held out of the training split."""
    return bool(getattr(args, "val_holdout", None))


def describe(args, rank: int = 0, barrier=lambda: None) -> DataInfo:
    """Locate the dataset (downloading Fashion-MNIST on rank 0 if needed) and describe it."""
    if args.dataset == "imagefolder":
        split = args.train_split if uses_holdout(args) else args.val_split
        classes = imagefolder_classes(os.path.join(args.data_dir, split))
        return DataInfo(len(classes), 3, args.img_size, classes=classes)
    folder = find_fashion_mnist(args.data_dir)
    if folder is None:
        root = args.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "butterfly")
        if rank == 0:
            download_fashion_mnist(root)
        barrier()
        folder = find_fashion_mnist(root)
        if folder is None:  # a rank on another node, without storage shared with rank 0
            folder = download_fashion_mnist(root)
    return DataInfo(10, 1, args.img_size or 28, folder)


def load_split(args, info: DataInfo, model, split: str, augment: bool) -> Dataset:
    """The ``"train"`` or ``"test"`` split (Fashion-MNIST t10k / ImageFolder ``--val-split``), with
    the training augmentation when ``augment`` and the evaluation transform otherwise."""
    if args.dataset == "fashion-mnist":
        hflip = args.hflip if getattr(args, "hflip", None) is not None else 0.5
        return FashionMNIST(info.fashion_dir, "train" if split == "train" else "val", info.img_size,
                            train=augment, hflip=hflip)
    from timm.data import create_transform, resolve_data_config
    cfg_args = {"input_size": (3, info.img_size, info.img_size)} if info.img_size else {}
    cfg = resolve_data_config(cfg_args, model=model)
    tf = imagefolder_train_transform(args, cfg) if augment else create_transform(**cfg)
    folder = args.train_split if split == "train" else args.val_split
    dataset = image_folder(os.path.join(args.data_dir, folder), tf)
    if info.classes is not None and dataset.classes != info.classes:
        odd = sorted(set(dataset.classes) ^ set(info.classes))
        raise DataError(f"the {args.train_split} and {args.val_split} folders of {args.data_dir} "
                        f"hold different class folders ({', '.join(odd[:5])} only in one); both "
                        "need the same classes")
    return dataset


def load_test_set(args, info: DataInfo, model=None) -> Dataset:
    """The test split with the evaluation transform (``--val-subset``: a fixed subset of it)."""
    return fixed_subset(load_split(args, info, model, "test", augment=False), args.val_subset)


def build_datasets(args, info: DataInfo, model=None, train: bool = True):
    """``(train_set or None, val_set)`` with the right transforms; the train set is seeded.

    The validation set is the test split, or with ``--val-holdout N`` a fixed N-image subset of the
    training split (evaluation transform) that is left out of the training set; the test split is
    then not loaded at all."""
    if not train:
        return None, load_test_set(args, info, model)
    train_set = load_split(args, info, model, "train", augment=not args.no_aug)
    rngs = getattr(train_set, "rngs", ("torch", "random", "numpy"))
    if uses_holdout(args):
        held, rest = holdout_split(len(train_set), args.val_holdout)
        val_set = Subset(load_split(args, info, model, "train", augment=False), held)
        train_set = Subset(train_set, rest)
    else:
        val_set = load_test_set(args, info, model)
    return SeededSamples(fixed_subset(train_set, args.train_subset), args.seed, rngs), val_set


def train_loader(dataset: SeededSamples, batch_size: int, workers: int, world: int, rank: int,
                 seed: int, pin: bool) -> Tuple[DataLoader, ResumableSampler]:
    """Loader over full batches; call ``sampler.set_position(epoch, start)`` before each epoch."""
    if len(dataset) < batch_size * world:
        raise DataError(f"the training set has {len(dataset)} images, fewer than one global "
                        f"batch ({batch_size} x {world} processes); lower --batch-size")
    sampler = ResumableSampler(dataset, world, rank, seed)
    # A private generator: the loader must not draw from the global RNG (resume would diverge).
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=pin, generator=torch.Generator().manual_seed(seed),
                        persistent_workers=False)
    return loader, sampler


def eval_loader(dataset: Dataset, batch_size: int, workers: int, world: int, rank: int,
                pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size, sampler=ShardSampler(len(dataset), world, rank),
                      num_workers=workers, pin_memory=pin, generator=torch.Generator())


def steps_per_epoch(dataset_len: int, batch_size: int, world: int) -> int:
    """Optimizer steps in one epoch (every rank takes the same number of full batches)."""
    return (-(-dataset_len // world)) // batch_size

