"""replace_pointwise on real torchvision/timm architectures, and param_groups."""
import pytest
import timm
import timm.optim
import timm.scheduler
import torch
import torchvision
from torch import nn

from butterfly import BFT, BFTLinear, is_bft, param_groups, replace_pointwise


def _train_step(model, x):
    opt = torch.optim.SGD(param_groups(model, 1e-5), lr=0.01, momentum=0.9)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_torchvision_mobilenet_v2():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    shape = model(x).shape
    model, names = replace_pointwise(model)
    # 16 expansion convs (every block but the first, t=1), 17 projections, the final 320->1280
    assert len(names) == 16 + 17 + 1
    assert "features.18.0" in names and "features.1.conv.1" in names
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert model(x).shape == shape
    _train_step(model, x)


def test_torchvision_shufflenet_v2_and_resnet_keep_strided_convs():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    _, names = replace_pointwise(model)
    # per unit: 2 pointwise convs in branch2, plus 1 in branch1 of the 3 downsampling units; conv5
    assert len(names) == 16 * 2 + 3 + 1
    resnet = torchvision.models.resnet50(num_classes=10)
    _, names = replace_pointwise(resnet)
    # conv1 and conv3 of 16 bottlenecks, plus layer1's stride-1 downsample; the strided 1x1s stay
    assert len(names) == 16 * 2 + 1
    assert isinstance(resnet.layer2[0].downsample[0], nn.Conv2d)
    assert isinstance(resnet.layer1[0].downsample[0], BFT)
    x = torch.randn(1, 3, 64, 64)
    assert resnet(x).shape == (1, 10)


def test_timm_model_with_filter_linear_and_dtype():
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).to(torch.float64)
    n_pointwise = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d)
                      and m.kernel_size == (1, 1) and m.groups == 1)
    model, names = replace_pointwise(model, filter_fn=lambda name, m: "se" not in name.split("."),
                                     linear=True, base=2)
    se_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and ".se." in f".{n}."]
    assert len(se_convs) > 0 and len(names) == n_pointwise - len(se_convs) + 1  # + the classifier
    assert isinstance(model.get_classifier(), BFTLinear)
    bfts = [m for m in model.modules() if is_bft(m)]
    assert all(m.weight.dtype == torch.float64 and m.base == 2 for m in bfts)
    _train_step(model, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_bias_is_kept():
    model = nn.Sequential(nn.Conv2d(8, 16, 1, bias=True), nn.Conv2d(16, 16, 1, stride=2))
    model, names = replace_pointwise(model)
    assert names == ["0"] and model[0].bias is not None
    assert isinstance(model[1], nn.Conv2d)


def test_param_groups_keep_bft_norm_and_bias_out_of_decay():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), BFT(16, 32, bias=True))
    decay, no_decay = param_groups(model, 4e-5)
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [model[0].weight.shape]
    ids = {id(p) for p in no_decay["params"]}
    assert id(model[2].weight) in ids and id(model[2].bias) in ids and id(model[1].weight) in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_param_groups_give_bft_weights_their_own_decay_and_lr_scale():
    """With ``bft_weight_decay`` or ``bft_lr_scale`` the BFT weights get a third group, and timm's
    scheduler sets its learning rate to the schedule's times ``lr_scale`` at every update."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), BFT(16, 32, bias=True))
    decay, no_decay, bft = param_groups(model, 4e-5, bft_weight_decay=1e-4, bft_lr_scale=0.5)
    assert [id(p) for p in bft["params"]] == [id(model[2].weight)]
    assert bft["weight_decay"] == 1e-4 and bft["lr_scale"] == 0.5
    assert id(model[2].bias) in {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) + 1 == len(list(model.parameters()))
    opt = timm.optim.create_optimizer_v2([decay, no_decay, bft], opt="sgd", lr=0.2,
                                         weight_decay=4e-5)
    sched, _ = timm.scheduler.create_scheduler_v2(opt, sched="cosine", num_epochs=10,
                                                  warmup_epochs=0, step_on_epochs=False,
                                                  updates_per_epoch=10)
    sched.step_update(5)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == lrs[1] and lrs[2] == pytest.approx(0.5 * lrs[0]) and lrs[0] < 0.2
    assert [g["weight_decay"] for g in opt.param_groups] == [4e-5, 0.0, 1e-4]


def test_layers_with_one_channel_are_kept_and_reported():
    """A BFT needs two channels on each side: 1x1 layers with one are kept dense, with a warning,
    and ``names.skipped`` says why; ``names`` is still the list of replaced layers."""
    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.Conv2d(16, 1, 1), nn.Conv2d(1, 8, 1),
                          nn.Flatten(), nn.Linear(128, 1), nn.Linear(1, 4))
    with pytest.warns(UserWarning, match=r"kept 4 dense layer\(s\), 1 \(16 -> 1\), 2 \(1 -> 8\), "
                                         r"4 \(128 -> 1\), 5 \(1 -> 4\)"):
        model, names = replace_pointwise(model, linear=True)
    assert names == ["0"] and isinstance(names, list)
    assert set(names.skipped) == {"1", "2", "4", "5"}
    assert all("keep the dense layer" in why for why in names.skipped.values())
    assert [type(m).__name__ for m in model] == ["BFT", "Conv2d", "Conv2d", "Flatten", "Linear",
                                                 "Linear"]
    assert model(torch.randn(2, 16, 4, 4)).shape == (2, 4)
    # a vetoed layer is neither replaced nor reported
    _, names = replace_pointwise(nn.Sequential(nn.Conv2d(8, 1, 1)), filter_fn=lambda n, m: False)
    assert names == [] and names.skipped == {}


def test_convert_keeps_one_channel_convs():
    from butterfly import convert

    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 1, 1))
    model, report = convert(model, torch.randn(4, 16, 3, 3), steps=5)
    assert [f.name for f in report] == ["0"]
    assert isinstance(model[0], BFT) and isinstance(model[2], nn.Conv2d)
