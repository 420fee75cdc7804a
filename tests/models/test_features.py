"""Feature maps of the model zoo, as timm's MobileNets have them: ``feature_info`` on every model,
``timm.create_model(name, features_only=True, out_indices=...)`` through timm's own extractors
(FeatureListNet, FeatureDictNet, FeatureHookNet, FeatureGetterNet via ``forward_intermediates``,
FeatureGraphNet via FX), so that any zoo model can serve as a detection or segmentation backbone."""
import re

import pytest
import timm
import torch
from timm.models._features import FeatureGetterNet
from torch import nn

import butterfly
from butterfly.models import registered_models

MODELS = registered_models()
BFT_MODELS = [n for n in MODELS if "_bft_" in n]
# one baseline and one BFT model of every family
FAMILIES = ["mobilenetv1_025", "mobilenetv1_bft_100", "mobilenetv2_bft_100",
            "mobilenetv3_small_035", "mobilenetv3_small_bft_050", "shufflenetv2_050",
            "shufflenetv2_bft_125"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_maps(model, feats, x, n_maps):
    info = model.feature_info
    assert len(feats) == n_maps == len(info.channels()) == len(info.reduction())
    assert [f.shape[1] for f in feats] == info.channels()
    assert [x.shape[-1] // f.shape[-1] for f in feats] == info.reduction()
    assert [x.shape[-2] // f.shape[-2] for f in feats] == info.reduction()
    assert all(f.shape[0] == x.shape[0] and torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("name", MODELS)
def test_features_only_maps_match_feature_info(name):
    # the classification model describes its maps: one per output stride, each a real module
    classifier = timm.create_model(name)
    assert [f["reduction"] for f in classifier.feature_info] == [2, 4, 8, 16, 32]
    modules = dict(classifier.named_modules())
    assert all(f["module"] in modules for f in classifier.feature_info)

    model = timm.create_model(name, features_only=True).eval()
    assert isinstance(model, timm.models.FeatureListNet)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _check_maps(model, model(x), x, 5)
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]

    # the stride-1 stem of small_input halves every reduction; any subset of the maps
    small = timm.create_model(name, features_only=True, small_input=True, in_chans=1,
                              out_indices=(1, 3, 4)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        _check_maps(small, small(x), x, 3)
    assert small.feature_info.reduction() == [2, 8, 16]
    # the extractor stops at the last map it returns: no head, no classifier
    assert not any(k.startswith(("head", "classifier")) for k in model.state_dict())


def _randomize(model):
    """Weights and BatchNorm statistics far from their initialisation, so that taking the wrong
    activation, or the right one with the wrong weights, shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.2))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def _classifier_key(feature_key):
    """FeatureListNet flattens the model's top-level nn.Sequential containers: blocks_3 <- blocks.3"""
    return re.sub(r"^(blocks|stages|stem)_(\d+)\.", r"\1.\2.", feature_key)


@pytest.mark.parametrize("name", BFT_MODELS)
def test_bft_features_are_the_classifiers_activations(name):
    classifier = timm.create_model(name)
    _randomize(classifier)
    classifier.eval()
    model = timm.create_model(name, features_only=True).eval()
    weights = classifier.state_dict()
    model.load_state_dict({k: weights[_classifier_key(k)] for k in model.state_dict()})

    taps, handles = {}, []
    for module in model.feature_info.module_name():
        hook = lambda mod, inp, out, module=module: taps.__setitem__(module, out.clone())
        handles.append(classifier.get_submodule(module).register_forward_hook(hook))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        classifier(x)
        feats = model(x)
        final, intermediates = classifier.forward_intermediates(x)
        last_two = classifier.forward_intermediates(x, indices=2, intermediates_only=True)
        expected = classifier.forward_features(x)
    for h in handles:
        h.remove()
    assert len(feats) == len(taps) == 5
    for feat, module, inter in zip(feats, model.feature_info.module_name(), intermediates):
        torch.testing.assert_close(feat, taps[module], rtol=0, atol=0)
        torch.testing.assert_close(inter, taps[module], rtol=0, atol=0)
    torch.testing.assert_close(final, expected, rtol=0, atol=0)
    assert [t.shape for t in last_two] == [t.shape for t in feats[-2:]]


@pytest.mark.parametrize("name", ["mobilenetv3_small_bft_050", "shufflenetv2_bft_125",
                                  "mobilenetv1_bft_100"])
def test_bft_feature_maps_backward(name):
    model = timm.create_model(name, features_only=True, out_indices=(1, 2, 3)).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    feats = model(x)
    assert len(feats) == 3
    sum(f.square().mean() for f in feats).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    bft_weights = [m.weight for m in model.modules() if butterfly.is_bft(m)]
    assert bft_weights and all(w.grad is not None and w.grad.abs().sum() > 0 for w in bft_weights)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # the extractor ends at the last map asked for
    full = timm.create_model(name, features_only=True)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("name", ["mobilenetv2_bft_100", "mobilenetv3_small_bft_050",
                                  "shufflenetv2_bft_125"])
def test_timm_feature_classes_agree(name):
    """dict, hook (forward hooks) and getter (forward_intermediates, pruned model) give the list
    extractor's maps; same seed, same weights."""
    def create(**kwargs):
        torch.manual_seed(0)
        return timm.create_model(name, features_only=True, out_indices=(0, 2, 3), **kwargs).eval()

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = create()(x)
        for cls, wrapper in (("dict", timm.models.FeatureDictNet),
                             ("hook", timm.models.FeatureHookNet),
                             ("getter", FeatureGetterNet)):
            model = create(feature_cls=cls)
            assert isinstance(model, wrapper)
            feats = model(x)
            feats = list(feats.values()) if isinstance(feats, dict) else feats
            assert model.feature_info.channels() == [f.shape[1] for f in expected]
            for feat, ref in zip(feats, expected):
                torch.testing.assert_close(feat, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mobilenetv2_bft_100", "mobilenetv3_small_bft_050",
                                  "shufflenetv2_bft_125"])
def test_prune_intermediate_layers(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1, 2], stop_early=True,
                                            intermediates_only=True)
        for a, b in zip(early, full[1:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        kept = model.prune_intermediate_layers([1, 2])
        assert kept == [1, 2]
        assert model.num_features == model.feature_info[2]["num_chs"]
        assert model.get_classifier().__class__ is nn.Identity
        # the kept layers keep their names and weights; the features end at the last map kept
        torch.testing.assert_close(model.forward_features(x), full[2], rtol=0, atol=0)
        assert model(x).shape == (1, model.feature_info[2]["num_chs"])
        for a, b in zip(model.forward_intermediates(x, indices=[1, 2])[1], full[1:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mobilenetv3_small_bft_050", "shufflenetv2_bft_125",
                                  "mobilenetv1_bft_100", "shufflenetv2_050"])
def test_features_only_channels_last(name):
    model = timm.create_model(name, features_only=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        # channels_last input, then a channels_last model as well
        for convert_model in (False, True):
            if convert_model:
                model = model.to(memory_format=torch.channels_last)
            feats = model(x.contiguous(memory_format=torch.channels_last))
            _check_maps(model, feats, x, 5)
            for feat, ref in zip(feats, expected):
                torch.testing.assert_close(feat, ref, rtol=1e-4, atol=1e-5)
    feats = model.train()(x.contiguous(memory_format=torch.channels_last).requires_grad_())
    sum(f.mean() for f in feats).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("ours, theirs, skip", [
    ("mobilenetv1_bft_100", "mobilenetv1_100", 0),
    ("mobilenetv2_bft_100", "mobilenetv2_100", 0),
    # our MobileNetV3-Small scales the stem with the width, timm keeps it 16 wide
    ("mobilenetv3_small_bft_050", "mobilenetv3_small_050", 1)])
def test_maps_match_timms_counterparts(ours, theirs, skip):
    """A BFT model drops into a timm backbone's place: the same maps as timm's own model of that
    family and width (timm's feature_info, no forward pass needed)."""
    mine, timms = timm.create_model(ours).feature_info, timm.create_model(theirs).feature_info
    assert [f["reduction"] for f in mine] == [f["reduction"] for f in timms]
    assert [f["num_chs"] for f in mine][skip:] == [f["num_chs"] for f in timms][skip:]


@pytest.mark.parametrize("name", [n for n in FAMILIES])
def test_fx_symbolic_trace(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    graph = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x))
        # another batch size and resolution: no shape was baked into the graph
        y = torch.randn(1, 3, 96, 96)
        torch.testing.assert_close(graph(y), model(y))
    features = timm.create_model(name, features_only=True).eval()
    graph = torch.fx.symbolic_trace(features)
    with torch.no_grad():
        for a, b in zip(graph(x), features(x)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", [n for n in FAMILIES])
def test_fx_feature_extractors(name):
    """torchvision's create_feature_extractor on the feature_info modules, and timm's FX
    extractor (feature_cls="fx", FeatureGraphNet) give the maps of the list extractor."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    torch.manual_seed(0)
    expected = timm.create_model(name, features_only=True).eval()
    torch.manual_seed(0)
    fx = timm.create_model(name, features_only=True, feature_cls="fx").eval()
    assert isinstance(fx, timm.models.FeatureGraphNet)
    nodes = [f["module"] for f in model.feature_info]
    tv = create_feature_extractor(model, return_nodes=nodes).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = expected(x)
        for feats in (fx(x), list(tv(x).values())):
            assert len(feats) == len(ref) == 5
            for a, b in zip(feats, ref):
                torch.testing.assert_close(a, b)
