"""from_dense / convert: fitting BFT weights to dense pointwise layers."""
import os

import numpy as np
import pytest
import torch
from torch import nn

import butterfly
from oracle import SHAPE_CLASSES
from train.data import read_idx
from butterfly.passes.convert import relative_error
from butterfly.nn.factorization import factor_butterfly, fit_weights

SHAPES = SHAPE_CLASSES
F64 = {"dtype": torch.float64}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("residual", [True, False])
def test_from_dense_recovers_a_bft(shape, residual):
    c_in, c_out, base = shape
    source = butterfly.BFT(c_in, c_out, base=base, residual=residual, bias=True, **F64)
    nn.init.normal_(source.bias)
    fitted = butterfly.BFT.from_dense(source.to_conv2d(), base=base, steps=0)
    assert fitted.residual == residual  # "auto" picked the kind that fits
    assert fitted.fit_error < 1e-3
    assert relative_error(fitted, source.to_dense()) < 1e-3
    x = torch.randn(2, c_in, 3, 3, **F64)
    torch.testing.assert_close(fitted(x), source(x), rtol=1e-6, atol=1e-6)


def test_from_dense_recovers_a_float32_bft_linear():
    source = butterfly.BFTLinear(48, 100, init="ortho")
    fitted = butterfly.BFTLinear.from_dense(source.to_dense())
    assert isinstance(fitted, butterfly.BFTLinear) and fitted.weight.dtype == torch.float32
    assert fitted.fit_error < 1e-3 and relative_error(fitted, source.to_dense()) < 1e-3


def test_hierarchical_factorisation_is_exact_for_butterflies():
    layer = butterfly.BFT(96, 96, base=2, residual=False, **F64)  # radices (2, 2, 2, 2, 2, 3)
    matrix = layer.to_dense()
    stages = factor_butterfly(matrix.unsqueeze(0), layer.radices)
    assert [tuple(s.shape) for s in stages] == [(1, 96 // k, k, k) for k in layer.radices]
    flat = torch.cat([s.reshape(1, -1) for s in stages], dim=1)
    refit = butterfly.BFT(96, 96, base=2, residual=False, **F64)
    with torch.no_grad():
        refit.weight.copy_(flat.view(refit.weight.shape))
    torch.testing.assert_close(refit.to_dense(), matrix, rtol=0, atol=1e-12)


def test_refinement_lowers_the_error_of_a_dense_fit():
    weight = torch.randn(32, 32, **F64)
    plan = butterfly.make_plan(32, 32, 4)
    _, closed_form = fit_weights(weight, plan, residual=False, steps=0)
    _, refined = fit_weights(weight, plan, residual=False, steps=30)
    assert refined <= closed_form < 1  # a random matrix is far from a butterfly


def test_calibrated_fit_minimises_the_output_error():
    """With calibration inputs the fit targets ||(B - W) X||, so on those inputs it beats the
    matrix fit, and ``fit_error`` is that relative output error."""
    conv = nn.Conv2d(32, 32, 1, **F64)
    mix = torch.randn(32, 32, **F64) * torch.logspace(0, -2, 32, **F64)  # correlated channels
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(64, 32, 4, 4, **F64))
    plain = butterfly.BFT.from_dense(conv, steps=30)
    calibrated = butterfly.BFT.from_dense(conv, calib=x, steps=30)
    assert calibrated.fit_error == pytest.approx(relative_error(calibrated, conv.weight, calib=x))
    assert calibrated.fit_error < relative_error(plain, conv.weight, calib=x)
    torch.testing.assert_close(calibrated.bias, conv.bias)


def test_from_dense_errors():
    with pytest.raises(TypeError, match="pointwise nn.Conv2d"):
        butterfly.BFT.from_dense(nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"\(out, in\)"):
        butterfly.BFT.from_dense(torch.randn(8, 8, 3))
    with pytest.raises(ValueError, match="residual must be"):
        butterfly.BFT.from_dense(torch.randn(8, 8), residual="yes")
    with pytest.raises(ValueError, match="expected a dense weight of shape"):
        fit_weights(torch.randn(8, 4), butterfly.make_plan(8, 8, 4))


def test_convert_replaces_pointwise_layers_and_reports():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 1), nn.ReLU(),
                          nn.Conv2d(32, 32, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10))
    x = torch.randn(8, 3, 10, 10)
    copy, report = butterfly.convert(model, x, inplace=False, linear=True, steps=5,
                                     filter_fn=lambda name, m: name != "3")
    assert [f.name for f in report] == ["1", "6"] and all(f.calibrated for f in report)
    assert isinstance(copy[1], butterfly.BFT) and isinstance(copy[6], butterfly.BFTLinear)
    assert isinstance(copy[3], nn.Conv2d) and isinstance(model[1], nn.Conv2d)  # veto, copy
    assert report[0].dense_macs == 16 * 32 and report[0].bft_macs == copy[1].macs_per_pixel
    assert "rel. error" in str(report) and "16->32" in str(report)
    dense_weight = model[1].weight.detach().clone()
    same, report = butterfly.convert(model, steps=0)
    assert same is model and [f.name for f in report] == ["1", "3"]
    assert not any(f.calibrated for f in report)
    assert report[0].rel_error == pytest.approx(relative_error(model[1], dense_weight), rel=1e-4)


FASHION = "/usr/share/datasets/fashion-mnist"


def _idx(name: str, count: int) -> np.ndarray:
    """The first ``count`` items of one of the Debian package's IDX files."""
    return read_idx(os.path.join(FASHION, name))[:count].copy()


def _fashion(split: str, count: int):
    images = torch.from_numpy(_idx(f"{split}-images-idx3-ubyte.gz", count)).float()
    labels = torch.from_numpy(_idx(f"{split}-labels-idx1-ubyte.gz", count).astype(np.int64))
    return ((images / 255 - 0.286) / 0.353).unsqueeze(1), labels


def _small_mobilenet(width: int = 32) -> nn.Module:
    """A MobileNetV1-style CNN for 28x28 inputs: depthwise 3x3 + pointwise 1x1 blocks."""
    def block(c_in, c_out, stride):
        return [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         *block(16, width, 1), *block(width, 2 * width, 2),
                         *block(2 * width, 2 * width, 1), *block(2 * width, 4 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def _train(model, x, y, epochs, lr):
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST not found in " + FASHION)
def test_converted_model_keeps_most_accuracy_after_one_epoch(one_thread):
    """Dense CNN trained briefly -> convert (calibrated) -> one epoch of fine-tuning."""
    x_train, y_train = _fashion("train", 4000)
    x_test, y_test = _fashion("t10k", 2000)
    model = _small_mobilenet()
    _train(model, x_train, y_train, epochs=3, lr=3e-3)
    dense = _accuracy(model, x_test, y_test)
    model, report = butterfly.convert(model, x_train[:512])
    assert len(report) == 4 and all(butterfly.is_bft(model[int(f.name)]) for f in report)
    converted = _accuracy(model, x_test, y_test)
    _train(model, x_train, y_train, epochs=1, lr=3e-3)
    tuned = _accuracy(model, x_test, y_test)
    print(f"\n{report}\nFashion-MNIST accuracy: dense {dense:.4f}, converted {converted:.4f}, "
          f"after 1 epoch {tuned:.4f}")
    assert dense > 0.75
    assert tuned > 0.9 * dense  # measured: dense 0.80, converted 0.20, after 1 epoch 0.77
