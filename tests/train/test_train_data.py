"""ImageFolder data: errors that name the bad file or folder, and training augmentation that
follows the input size; Fashion-MNIST's augmentation stays seeded per sample."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_train import DATA, TINY, _train, make_imagefolder
from train import data, error_message
from train.args import parse_args
from train.distributed import setup
from train.loop import Trainer

pytestmark = [pytest.mark.skipif(DATA is None, reason="Fashion-MNIST not found"),
              pytest.mark.usefixtures("one_thread")]


def _folder_args(root, *extra):
    return parse_args(TINY + ["--dataset", "imagefolder", "--data-dir", str(root), "--img-size",
                              "28", "--small-input", "--batch-size", "32", "--epochs", "1",
                              *extra])


# --------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_corrupt_image_error_names_the_file(tmp_path, workers):
    root = make_imagefolder(tmp_path / "data", {"train": range(64), "val": range(256, 356)})
    bad = next((root / "train").rglob("*.png"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(data.DataError) as info:
        _train(["--dataset", "imagefolder", "--data-dir", str(root), "--img-size", "28",
                "--small-input", "--batch-size", "32", "--epochs", "1", "--workers", workers,
                "--output", str(tmp_path / "run")])
    assert str(bad) in str(info.value)
    assert error_message(info.value).startswith(f"cannot read image {bad}")


def test_a_run_stopped_by_a_bad_image_leaves_its_folder_reusable(tmp_path):
    """It stopped before its first checkpoint: its args.yaml and TensorBoard events do not make
    the folder hold a run, so the rerun needs no --overwrite, and replaces them."""
    import os
    root = make_imagefolder(tmp_path / "data", {"train": range(64), "val": range(256, 296)})
    bad = next((root / "train").rglob("*.png"))
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "run"
    argv = ["--dataset", "imagefolder", "--data-dir", str(root), "--img-size", "28",
            "--small-input", "--batch-size", "32", "--epochs", "1", "--log-tensorboard",
            "--output", str(out)]
    with pytest.raises(data.DataError):
        _train(argv)
    left = os.listdir(out)
    assert "args.yaml" in left and any(n.startswith("events.out.tfevents.") for n in left)
    bad.write_bytes(good)
    _train(argv)  # no "already holds files"
    events = [n for n in os.listdir(out) if n.startswith("events.out.tfevents.")]
    assert len(events) == 1 and (out / "last.pth").exists()  # the failed run's log went


def test_an_empty_class_folder_is_a_clear_error(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": range(64), "val": range(256, 356)})
    (root / "train" / "Unused").mkdir()
    with pytest.raises(data.DataError, match=r"train: the class folder\(s\) Unused hold no images"):
        Trainer(_folder_args(root, "--output", str(tmp_path / "run")), setup("cpu"))


# ------------------------------------------------------------------------------ augmentation
def _steps(args, size):
    from timm.data import resolve_data_config
    cfg = resolve_data_config({"input_size": (3, size, size)})
    tf = data.imagefolder_train_transform(args, cfg)
    names = []

    def walk(t):
        for s in getattr(t, "transforms", [t]):
            if hasattr(s, "transforms"):
                walk(s)
            else:
                names.append(s)
    walk(tf)
    return tf, {type(s).__name__: s for s in names}


def test_small_inputs_get_a_padded_random_crop_and_no_flip(tmp_path):
    from PIL import Image
    root = make_imagefolder(tmp_path / "data", {"train": range(4), "val": range(4, 8)})
    tf, steps = _steps(_folder_args(root), 28)
    assert "RandomResizedCropAndInterpolation" not in steps and "ColorJitter" not in steps
    assert "RandomHorizontalFlip" not in steps and steps["RandomCrop"].padding == 3
    assert tf(Image.new("RGB", (28, 28))).shape == (3, 28, 28)
    _, steps = _steps(_folder_args(root, "--hflip", "0.5"), 28)
    assert steps["RandomHorizontalFlip"].p == 0.5
    _, steps = _steps(_folder_args(root, "--scale", "0.35", "1"), 28)
    assert steps["RandomResizedCropAndInterpolation"].scale == (0.35, 1.0)


def test_large_inputs_get_timms_imagenet_augmentation(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": range(4), "val": range(4, 8)})
    _, steps = _steps(_folder_args(root), 224)
    assert steps["RandomResizedCropAndInterpolation"].scale == (0.08, 1.0)
    assert steps["RandomHorizontalFlip"].p == 0.5 and "ColorJitter" in steps
    _, steps = _steps(_folder_args(root, "--aa", "rand-m9-mstd0.5", "--hflip", "0"), 224)
    assert "RandAugment" in steps and "RandomHorizontalFlip" not in steps


def _old_fashion_augmentation(dataset, index):
    """Fashion-MNIST's training augmentation as it was written before --hflip existed."""
    x = dataset.images[index].unsqueeze(0).float().div_(255)
    dy, dx = torch.randint(-2, 3, (2,)).tolist()
    x = torch.roll(F.pad(x, (2, 2, 2, 2)), (dy, dx), (1, 2))[:, 2:-2, 2:-2]
    if torch.rand(()) < 0.5:
        x = x.flip(2)
    return (x - data.FASHION_MNIST_MEAN) / data.FASHION_MNIST_STD


def test_fashion_mnist_augmentation_is_seeded_per_sample_and_unchanged():
    train = data.FashionMNIST(DATA, "val", train=True)  # t10k: smaller, the same code path
    seeded = data.SeededSamples(train, seed=3, rngs=train.rngs)
    for key in ((0, 5), (2, 5), (1, 123)):
        x, y = seeded[key]
        assert torch.equal(x, seeded[key][0])  # the same crop and flip every time
        torch.manual_seed(hash((3, *key)) % (2 ** 32))
        assert torch.equal(x, _old_fashion_augmentation(train, key[1]))
    assert not torch.equal(seeded[(0, 5)][0], seeded[(2, 5)][0])  # other epochs draw otherwise
    never = data.SeededSamples(data.FashionMNIST(DATA, "val", train=True, hflip=0.0), seed=3)
    plain = data.FashionMNIST(DATA, "val")[5][0]
    assert not any(torch.equal(never[(e, 5)][0], plain.flip(2)) for e in range(8))
