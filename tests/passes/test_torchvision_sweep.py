"""torchvision networks through the whole pipeline a user runs: replace the pointwise convs with
BFTs, then export to ONNX (checked with onnxruntime) and densify (checked against the BFT model).
Slow (the export takes most of a minute per network): ``pytest -m slow`` runs it."""
import pytest
import torch
import torchvision

import butterfly
from butterfly.passes.export import check_onnx

MODELS = ["mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_replace_export_and_densify(name, tmp_path):
    torch.manual_seed(0)
    model, replaced = butterfly.replace_pointwise(getattr(torchvision.models, name)(num_classes=10))
    assert replaced
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    path = butterfly.export_onnx(model, x, tmp_path / f"{name}.onnx", dynamic_batch=True)
    scale = model(x).abs().max().item()
    assert check_onnx(path, model, torch.randn(3, 3, 32, 32)) < 1e-4 * (1 + scale)
    dense = butterfly.densify(model, inplace=False)
    assert not any(butterfly.is_bft(m) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), rtol=1e-4, atol=1e-4 * (1 + scale))
