"""The model zoo: every model builds through timm, runs forward and backward at 224 and, with
``small_input=True``, on 28x28 one-channel images; BFT variants have BFTs where the papers put
them and nowhere else; timm's own names are left alone."""
import pytest
import timm
import torch

import butterfly
from butterfly.models import create_pointwise, registered_models
from butterfly.models.builder import register
from butterfly.passes.surgery import is_pointwise_conv

MODELS = registered_models()
BFT_MODELS = [n for n in MODELS if "_bft_" in n]
EXPECTED = {"mobilenetv1_025", "mobilenetv1_050", "mobilenetv1_075", "mobilenetv1_bft_100",
            "mobilenetv1_bft_200", "mobilenetv2_bft_100", "mobilenetv3_small_035",
            "mobilenetv3_small_bft_050", "shufflenetv2_050", "shufflenetv2_100",
            "shufflenetv2_150", "shufflenetv2_200", "shufflenetv2_bft_125"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_the_zoo():
    assert set(MODELS) == EXPECTED
    # benchmarks.reproduce registers ablation variants ("<model>__<options>") at run time
    listed = {name for name in timm.list_models("*bft*") if "__" not in name}
    assert listed == set(BFT_MODELS)
    for name in MODELS:
        assert timm.models.model_entrypoint(name).__module__.startswith("butterfly.models.")
    # timm's own models keep their names
    for name in ("mobilenetv1_100", "mobilenetv2_100", "mobilenetv3_small_050"):
        assert timm.models.model_entrypoint(name).__module__.startswith("timm.models.")


def test_register_never_overwrites_timm():
    def mobilenetv2_100(pretrained=False, **kwargs):
        raise AssertionError("must not be registered")

    with pytest.warns(UserWarning, match="already registers"):
        register(mobilenetv2_100)
    assert timm.models.model_entrypoint("mobilenetv2_100").__module__ == "timm.models.efficientnet"


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_224_and_small_input(name):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_rate=0.2)
    x = torch.randn(1, 3, 224, 224)
    out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    small = timm.create_model(name, small_input=True, in_chans=1, num_classes=10)
    out = small(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in small.parameters())


def test_small_input_keeps_resolution():
    """The stride-1 stem halves the total stride: 28 -> 2x2 and 32 -> 2x2 final maps (16x)."""
    for name in ("mobilenetv1_025", "shufflenetv2_050", "mobilenetv3_small_035"):
        model = timm.create_model(name, small_input=True, num_classes=10).eval()
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (2, 2)
        assert timm.create_model(name).eval().forward_features(
            torch.randn(1, 3, 32, 32)).shape[-2:] == (1, 1)


def test_timm_kwargs_and_head():
    model = timm.create_model("shufflenetv2_bft_125", num_classes=0, in_chans=4).eval()
    feats = model(torch.randn(2, 4, 64, 64))
    assert feats.shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(torch.randn(2, 4, 64, 64)).shape == (2, 7)
    v3 = timm.create_model("mobilenetv3_small_bft_050").eval()
    x = v3.forward_features(torch.randn(1, 3, 64, 64))
    assert v3.forward_head(x, pre_logits=True).shape == (1, 1024)
    assert v3.pretrained_cfg["first_conv"] == "stem.conv"


@pytest.mark.parametrize("name", ["mobilenetv1_025", "shufflenetv2_bft_125"])
def test_pretrained_raises_clear_error(name):
    with pytest.raises(RuntimeError, match="no pretrained weights are published"):
        timm.create_model(name, pretrained=True)


def _layers(model):
    bfts = [n for n, m in model.named_modules() if butterfly.is_bft(m)]
    convs = [n for n, m in model.named_modules() if is_pointwise_conv(m)]
    return bfts, convs


@pytest.mark.parametrize("name", BFT_MODELS)
def test_bft_models_replace_every_pointwise_conv(name):
    bfts, convs = _layers(timm.create_model(name))
    assert len(bfts) > 10
    if name.startswith("shufflenetv2"):
        # the paper keeps the pointwise convs reading the 24-channel stem dense
        assert convs == ["stages.0.0.branch1.1.conv", "stages.0.0.branch2.0.conv"]
    else:
        assert convs == []


@pytest.mark.parametrize("name", sorted(EXPECTED - set(BFT_MODELS)))
def test_baselines_have_no_bft(name):
    bfts, convs = _layers(timm.create_model(name))
    assert bfts == [] and len(convs) > 10


def test_bft_twin_has_the_same_structure():
    """A BFT model is its baseline with the pointwise layers swapped, nothing else."""
    base = timm.create_model("shufflenetv2_050")
    twin = timm.create_model("shufflenetv2_050", bft=True)
    b_names = {n for n, m in base.named_modules() if is_pointwise_conv(m)}
    t_names = {n for n, m in twin.named_modules() if butterfly.is_bft(m)}
    assert t_names == b_names - {"stages.0.0.branch1.1.conv", "stages.0.0.branch2.0.conv"}
    def others(model):
        return [type(m).__name__ for m in model.modules()
                if not (is_pointwise_conv(m) or butterfly.is_bft(m))]

    assert others(base) == others(twin)


def test_bft_kwargs_reach_every_layer():
    model = timm.create_model("mobilenetv1_bft_100", bft_kwargs=dict(base=2, residual=False))
    layers = [m for m in model.modules() if butterfly.is_bft(m)]
    assert all(set(m.radices) <= {2} and not m.residual for m in layers)


def test_create_pointwise():
    conv = create_pointwise(16, 24)
    assert is_pointwise_conv(conv) and conv.bias is None
    bft = create_pointwise(16, 24, bft=True, bias=True, base=2)
    assert butterfly.is_bft(bft) and bft.radices == (2, 2, 2, 2) and bft.bias is not None
    x = torch.randn(2, 16, 3, 3)
    assert conv(x).shape == bft(x).shape == (2, 24, 3, 3)
    with pytest.raises(TypeError, match="bft=True"):
        create_pointwise(16, 24, base=2)


def test_a_source_snapshot_imports_its_own_models_and_kernels(tmp_path):
    """A copy of the checkout run without installing it (``benchmarks.reproduce`` works from
    such snapshots) gets its own models/ and csrc/ as butterfly.models and butterfly.csrc, even
    where another copy is installed."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    for name in ("butterfly", "models", "csrc"):
        shutil.copytree(repo / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(repo / "pyproject.toml", tmp_path / "pyproject.toml")
    code = ("import butterfly, butterfly.models, butterfly.csrc; "
            "print(butterfly.models.__file__); print(list(butterfly.csrc.__path__)[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    models_file, csrc_dir = out.stdout.split()
    assert Path(models_file).resolve().is_relative_to(tmp_path.resolve())
    assert Path(csrc_dir).resolve() == (tmp_path / "csrc").resolve()
