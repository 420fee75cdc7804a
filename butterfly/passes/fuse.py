"""Fusing a network for inference: eval-mode BatchNorms folded, activations and residual additions
moved into the epilogue of the layer before them.

The network is traced with ``torch.fx`` (BFT layers as leaves) and every chain

    (BFT | Conv2d) -> [BatchNorm2d] -> [activation] -> [+ other]

whose intermediate results have no other use becomes one fused layer:

* :class:`FusedBFT`: the ``butterfly::bft_fused`` operator (:mod:`butterfly.ops.bft_fused`): the
  BatchNorm (and the BFT's bias) as a per-channel scale and shift, which is exact with the
  residual, then the activation and the addition, all before the kernel's one store;
* :class:`FusedConv`: the conv with the BatchNorm folded into its weights and bias
  (``torch.nn.utils.fusion.fuse_conv_bn_eval``). A depthwise conv that
  ``butterfly::depthwise_conv`` computes runs it on CPU, the bias and activation in the kernel's
  epilogue (:mod:`butterfly.ops.depthwise`); a dense conv over at most
  :data:`SMALL_INPUT_CHANNELS` input channels (a stem) may run
  ``butterfly_cpu::small_input_conv_cl`` on channels_last CPU input, the bias and activation
  fused (``csrc/graph/small_input_conv.h``);
  other convs run by oneDNN with the activation (or the addition) as a post-op where PyTorch
  exposes it (``torch.ops.mkldnn._convolution_pointwise``, float32 CPU), else as ``conv2d``
  followed by the activation. :func:`butterfly.optimize_for_inference` keeps the library's
  kernels where it measures them faster.

:func:`merge_separable` then joins a fused depthwise conv and the fused BFT that reads it into a
:class:`FusedDepthwiseBFT`, one ``butterfly::dw_bft_fused`` pass (:mod:`butterfly.ops.dw_bft_fused`)
in which the depthwise output never goes to memory; :func:`butterfly.optimize_for_inference`
keeps it where it measures faster.

ShuffleNetV2's concatenation and channel shuffle (``cat``, ``view``, ``transpose``, ``reshape``:
two copies, and the reshape turns channels_last into NCHW) become :func:`concat_shuffle`, one
pass that keeps the format; the split (``chunk``) stays a view, which the BFT kernel reads in
place (rows of channels at a stride).

Max pools (ShuffleNetV2's stem) become :class:`FusedMaxPool`: channels_last float CPU input runs
``butterfly_cpu::max_pool_cl`` (``csrc/graph/graph_ops_cpu.cpp``), which computes no indices.
Linear layers on 2-d inputs (classifiers) become :class:`FusedLinear`, which can run
``butterfly_cpu::linear_rows`` on a few rows where :func:`butterfly.optimize_for_inference`
measures it faster.

What is left alone is reported with the reason: BatchNorms without running statistics (eval mode
then normalises with batch statistics, which no fold reproduces), BatchNorms after anything else,
activations with another use, convolutions with non-zero padding modes. Fused layers are for
inference: in training mode, or with inputs that need gradients, they raise.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..nn.bft import BFT, dense_equivalent, is_bft
from ..nn.depthwise import DepthwiseConv2d, is_operator_conv
from ..ops.bft_fused import (Epilogue, activate, activate_, activation_of, bft_fused_image,
                              pixel_rows)
from ..ops.depthwise import depthwise_conv, kernel_args
from ..ops.dispatch import backend_for, current_backend, kernels_loaded, prepared
from ..ops.dw_bft_fused import dw_bft_fused, kernel_applies
from ..ops.reference import compute_dtype

_MKLDNN = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
# activation -> (oneDNN post-op name, its scalars), for the post-ops that treat NaN and Inf as
# PyTorch's activations do. oneDNN's relu, hardtanh (relu6) and hardsigmoid turn NaN into a
# number, so those activations run after the convolution, in place, in PyTorch.
_ONEDNN_ACT = {"none": ("none", []), "hardswish": ("hardswish", [])}
# The most input channels of a conv that butterfly_cpu::small_input_conv_cl computes (its
# outputs are reductions over k * k * in_channels terms: a network's first layer).
SMALL_INPUT_CHANNELS = 4


def is_small_input_conv(conv: nn.Conv2d) -> bool:
    """Whether ``butterfly_cpu::small_input_conv_cl`` computes ``conv``: dense (``groups ==
    1``), at most :data:`SMALL_INPUT_CHANNELS` input channels, a square kernel, equal strides,
    equal integer zero paddings and dilation 1."""
    return (conv.groups == 1 and conv.in_channels <= SMALL_INPUT_CHANNELS
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
            and not isinstance(conv.padding, str) and conv.padding[0] == conv.padding[1]
            and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros")


def _kernels_direct() -> bool:
    """Whether a fused layer may call its C++ kernel directly: not while torch.compile traces,
    and not under a dispatch mode (``FlopCounterMode`` and the like must see the operators)."""
    return not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


_CPU_CHOICES: Set[str] = set()   # use_backend choices under which the "cpu" kernels ran


def _cpu_kernel_direct(x: Tensor) -> bool:
    """Whether a fused layer may call a CPU kernel directly on ``x``: a CPU tensor, the ``"cpu"``
    backend chosen and its kernels loaded, and :func:`_kernels_direct`. The backend decision is
    taken once per :func:`butterfly.use_backend` choice (as the prepared layers take theirs): the
    graph's small operators run in a few microseconds at batch 1."""
    if not (x.is_cpu and _kernels_direct()):
        return False
    choice = current_backend()
    if choice not in _CPU_CHOICES:
        if backend_for(x.device).name != "cpu" or not kernels_loaded("cpu", x.device):
            return False
        _CPU_CHOICES.add(choice)
    return True


class _PreparedCache(nn.Module):
    """A fused layer that keeps the prepared forms of itself that the CPU backend built
    (:meth:`_prepared_for`). They are not saved with the layer: a fused model loaded in another
    process (or copied) prepares them again on its first call (loading the kernels then)."""

    _prepared: dict

    def _prepared_for(self, x: Tensor):
        """The layer's prepared form for inputs like ``x`` (None: the C++ kernels do not run
        them), built by :meth:`_prepare` on the first call per backend choice, device and dtype.
        The prepared form checked the layer's arguments once and is called without the
        dispatcher: a fixed cost per call that matters for small layers at batch 1, and so does
        this look-up's."""
        key = (current_backend(), x.dtype) if x.is_cpu else \
            (current_backend(), x.device.type, x.dtype)
        try:
            return self._prepared[key]
        except KeyError:
            layer = self._prepared[key] = self._prepare(x)
            return layer

    def _prepare(self, x: Tensor):
        raise NotImplementedError

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_prepared"] = {}
        return state


def _kernel_cast(x: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
    """A weight or epilogue tensor in the kernels' compute dtype for input ``x``."""
    return None if t is None else t.to(compute_dtype(x)).contiguous()


def _refuse_training(module: nn.Module, inputs: Tuple[Optional[Tensor], ...]) -> None:
    if module.training:
        raise RuntimeError(f"{type(module).__name__} is a fused inference layer: call .eval() on "
                           "the fused model, and train the original model instead (the fusion "
                           "pass does not change it)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise RuntimeError(f"{type(module).__name__} is a fused inference layer and has no "
                           "gradient: run it under torch.no_grad() or torch.inference_mode(), and "
                           "train the original model instead")


def _epilogue_add(add: Optional[Tensor], shape: Tuple[int, ...]) -> bool:
    """Whether ``add`` runs in the layer's epilogue: only an operand of the output's ``shape``.
    Another shape (an operand broadcast over the batch, such as a parameter, fused from a batch-1
    example) is added after the layer, by broadcasting, as the original model adds it."""
    return add is not None and tuple(add.shape) == tuple(shape)


def _conv_output_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, ...]:
    """``(N, C_out, H_out, W_out)`` of a convolution with explicit (integer) padding."""
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
            zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return (x.shape[0], weight.shape[0], *size)


class FusedBFT(_PreparedCache):
    """A BFT with its epilogue (:class:`butterfly.ops.bft_fused.Epilogue`), for inference. Takes
    ``(N, C, H, W)`` input in either memory format (and ``add`` of the output's shape when the
    epilogue adds), returns the output in the input's format."""

    def __init__(self, layer: BFT, epilogue: Epilogue):
        super().__init__()
        self.plan, self.residual = layer.plan, layer.residual
        self.register_buffer("weight", layer.weight.detach().clone())
        self.activation, self.adds = epilogue.activation, epilogue.add
        self.register_buffer("scale", None if epilogue.scale is None else epilogue.scale.detach())
        self.register_buffer("shift", None if epilogue.shift is None else epilogue.shift.detach())
        self._prepared: dict = {}   # see _prepared_for
        self.eval()   # an inference layer: built in eval mode

    @property
    def epilogue(self) -> Epilogue:
        return Epilogue(self.scale, self.shift, self.activation, self.adds)

    def _prepare(self, x: Tensor):
        """The layer prepared by the CPU backend for inputs like ``x``
        (:func:`butterfly.ops.dispatch.prepared`: the plan, weights and epilogue checked once,
        called without the dispatcher), or None when the kernel does not run them."""
        p = self.plan
        w = self.weight.view(p.num_blocks, p.weights_per_block)
        prepare = prepared("cpu", "bft_fused")
        if x.device.type != "cpu" or backend_for(x.device, x, w, p.radices).name != "cpu" \
                or not kernels_loaded("cpu", x.device) or prepare is None:
            return None
        return prepare(_kernel_cast(x, self.weight), p, self.residual,
                       _kernel_cast(x, self.scale), _kernel_cast(x, self.shift),
                       self.activation, x.dtype)

    def forward(self, x: Tensor, add: Optional[Tensor] = None) -> Tensor:
        _refuse_training(self, (x, add))
        if add is not None and not _epilogue_add(
                add, (x.shape[0], self.plan.out_channels, *x.shape[2:])):
            return self(x) + add
        if x.dim() == 4 and _kernels_direct():
            prepared = self._prepared_for(x)
            if prepared is not None:
                return prepared(x, add)
        epilogue = Epilogue(self.scale, self.shift, self.activation, add is not None)
        return bft_fused_image(x, self.weight, self.plan, self.residual, epilogue, add)

    def extra_repr(self) -> str:
        p = self.plan
        return (f"{p.in_channels}, {p.out_channels}, radices={p.radices}, "
                f"residual={self.residual}, epilogue={self.epilogue.describe()}")


class FusedConv(_PreparedCache):
    """A ``Conv2d`` (BatchNorm folded in) with its epilogue: ``act(conv(x)) + add``, or with
    ``add_first`` ``act(conv(x) + add)``, for inference."""

    # class defaults, so that a layer pickled before the kernel for few input channels existed
    # still runs (on PyTorch's convolution), and one pickled before the choice of the oneDNN
    # call still makes it
    small_input_geometry = small_input = False
    onednn_call = True

    def __init__(self, conv: nn.Conv2d, activation: str = "none", adds: bool = False):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        # padding: a list of ints, or PyTorch's "same" / "valid" (only F.conv2d takes those)
        self.stride = list(conv.stride)
        self.padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.activation, self.adds = activation, adds
        # kernel_geometry: what butterfly::depthwise_conv computes; depthwise: whether this layer
        # runs it (optimize_for_inference may hand it back to PyTorch's convolution)
        self.kernel_geometry = self.depthwise = is_operator_conv(conv)
        # small_input: whether this layer runs butterfly_cpu::small_input_conv_cl where it can;
        # off until optimize_for_inference measures it faster than oneDNN
        self.small_input_geometry, self.small_input = is_small_input_conv(conv), False
        # onednn_call: whether a float32 CPU conv calls oneDNN's fused convolution directly
        # (the epilogue a post-op) rather than PyTorch's conv2d; optimize_for_inference keeps
        # the faster of the two for each layer
        self.onednn_call = True
        self._prepared: dict = {}   # see _prepared_for
        self.eval()   # an inference layer: built in eval mode

    def _prepare(self, x: Tensor):
        """The depthwise conv prepared by the CPU backend for inputs like ``x`` (float32 or
        float64, :func:`butterfly.ops.dispatch.prepared`), or None when the kernel does not run
        them."""
        args = kernel_args(x, self.weight, self.bias, self.stride[0], self.activation)
        prepare = prepared("cpu", "depthwise_conv")
        if args is None or prepare is None or x.dtype not in (torch.float32, torch.float64):
            return None
        return prepare(args[0], args[1], self.stride[0], self.activation, x.dtype)

    def _small_input_kernel(self, x: Tensor) -> bool:
        return self.small_input_geometry and x.dim() == 4 \
            and x.dtype in (torch.float32, torch.float64) and self.weight.dtype == x.dtype \
            and x.is_contiguous(memory_format=torch.channels_last) and _cpu_kernel_direct(x)

    def _onednn(self, x: Tensor) -> bool:
        return _MKLDNN is not None and x.device.type == "cpu" and x.dtype == torch.float32 \
            and self.weight.dtype == torch.float32 and not isinstance(self.padding, str)

    def forward(self, x: Tensor, add: Optional[Tensor] = None) -> Tensor:
        _refuse_training(self, (x, add))
        geometry = (self.padding, self.stride, self.dilation, self.groups)
        if self.depthwise and x.is_cpu and x.dim() == 4:
            layer = self._prepared_for(x) if _kernels_direct() else None
            if layer is not None:
                y = layer(x)
            else:
                y = depthwise_conv(x, self.weight, self.bias, self.stride[0], self.activation)
        elif self.small_input and self._small_input_kernel(x):
            y = torch.ops.butterfly_cpu.small_input_conv_cl(
                x, self.weight, self.bias, self.stride[0], self.padding[0], self.activation)
        elif self.onednn_call and self._onednn(x) and _kernels_direct():   # traced: conv2d
            if self.activation == "none" and _epilogue_add(add, _conv_output_shape(
                    x, self.weight, self.stride, self.padding, self.dilation)):
                return _MKLDNN.binary(x, add, self.weight, self.bias, *geometry, "add", None,
                                      None, [], "")
            attr, scalars = _ONEDNN_ACT.get(self.activation, ("none", []))
            y = _MKLDNN(x, self.weight, self.bias, *geometry, attr, scalars, "")
            if self.activation not in _ONEDNN_ACT:
                y = activate_(y, self.activation)
        else:
            y = activate(F.conv2d(x, self.weight, self.bias, self.stride, self.padding,
                                  self.dilation, self.groups), self.activation)
        if add is None:
            return y
        return y.add_(add) if _epilogue_add(add, y.shape) else y + add

    def extra_repr(self) -> str:
        out, cin_g = self.weight.shape[:2]
        ops = "+".join(([self.activation] if self.activation != "none" else [])
                       + (["add"] if self.adds else [])) or "-"
        return (f"{cin_g * self.groups}, {out}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={tuple(self.stride)}, groups={self.groups}, epilogue={ops}")

    @classmethod
    def from_fused_bft(cls, fused: FusedBFT) -> "FusedConv":
        """The dense 1x1 conv that computes exactly what ``fused`` computes (epilogue included)."""
        layer = BFT(fused.plan.in_channels, fused.plan.out_channels, residual=fused.residual,
                    device=fused.weight.device, dtype=fused.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(fused.weight.view(layer.weight.shape))
        conv = dense_equivalent(layer)
        with torch.no_grad():
            if fused.scale is not None:
                conv.weight.mul_(fused.scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
            if fused.shift is not None:
                conv.bias = nn.Parameter(fused.shift.detach().to(conv.weight.dtype).clone())
        return cls(conv, fused.activation, fused.adds)


class FusedDepthwiseBFT(_PreparedCache):
    """A fused depthwise conv and the fused BFT that reads its output (the depthwise-separable
    block), for inference. With ``one_pass`` and an input the kernel takes, both run as one
    ``butterfly::dw_bft_fused`` pass (:mod:`butterfly.ops.dw_bft_fused`); otherwise, or once the
    BFT was made dense, the two layers ``dw`` and ``pw`` run one after the other (on such an
    input, in one call of the prepared block)."""

    def __init__(self, dw: FusedConv, pw: FusedBFT):
        super().__init__()
        self.dw, self.pw, self.one_pass = dw, pw, True
        self._prepared: dict = {}   # see _prepared_for
        self.eval()

    def _prepare(self, x: Tensor):
        """The block prepared by the CPU backend for inputs like ``x`` (in one
        ``butterfly::dw_bft_fused`` pass or apart, :func:`butterfly.ops.dispatch.prepared`), or
        None when the kernel does not run them, as decided by
        :func:`butterfly.ops.dw_bft_fused.kernel_applies`."""
        dw, pw = self.dw, self.pw
        prepare = prepared("cpu", "dw_bft_fused")
        if not kernel_applies(x, dw.weight, dw.stride[0]) or prepare is None:
            return None
        depthwise = dw._prepared_for(x)   # the block's depthwise conv, prepared as a layer
        if depthwise is None:
            return None
        return prepare(depthwise, _kernel_cast(x, pw.weight), pw.plan, pw.residual,
                       _kernel_cast(x, pw.scale), _kernel_cast(x, pw.shift), pw.activation)

    def forward(self, x: Tensor, add: Optional[Tensor] = None) -> Tensor:
        _refuse_training(self, (x, add))
        dw, pw = self.dw, self.pw
        if add is not None and x.dim() == 4 and isinstance(pw, FusedBFT) and \
                not _epilogue_add(add, (x.shape[0], pw.plan.out_channels,
                                        *[(n - 1) // dw.stride[0] + 1 for n in x.shape[2:]])):
            return self(x) + add
        if isinstance(pw, FusedBFT) and x.dim() == 4 and \
                x.is_contiguous(memory_format=torch.channels_last):
            if not _kernels_direct():
                if self.one_pass:   # one traced (or counted) operator, which falls back itself
                    return dw_bft_fused(x, dw.weight, dw.bias, dw.stride[0], dw.activation,
                                        pw.weight, pw.plan, pw.residual, pw.epilogue, add)
            else:
                layer = self._prepared_for(x)
                if layer is not None:   # both layers in one call, in one pass or apart
                    return layer(x, add) if self.one_pass else layer.apart(x, add)
        return pw(dw(x), add)

    def extra_repr(self) -> str:
        return f"one_pass={self.one_pass}"


class FusedMaxPool(nn.MaxPool2d):
    """An ``nn.MaxPool2d`` (square kernel, stride and padding, no dilation, floor rounding, no
    indices) for inference: channels_last float32/float64 CPU input runs
    ``butterfly_cpu::max_pool_cl``; any other input, a traced call, the reference backend or an
    input that needs gradients runs PyTorch's max pool."""

    @staticmethod
    def geometry(pool: nn.MaxPool2d) -> Optional[Tuple[int, int, int]]:
        """``(kernel_size, stride, padding)`` of a pool the kernel computes, else None."""
        def square(v):
            v = (v, v) if isinstance(v, int) else tuple(v)
            return v[0] if len(v) == 2 and v[0] == v[1] else None
        k, s, p = square(pool.kernel_size), square(pool.stride or pool.kernel_size), \
            square(pool.padding)
        d = square(pool.dilation)
        if None in (k, s, p) or d != 1 or pool.ceil_mode or pool.return_indices:
            return None
        return (k, s, p) if 2 * p <= k else None

    @classmethod
    def of(cls, pool: nn.MaxPool2d) -> "FusedMaxPool":
        k, s, p = cls.geometry(pool)
        return cls(k, s, p)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.dtype in (torch.float32, torch.float64) and \
                x.is_contiguous(memory_format=torch.channels_last) and \
                not (x.requires_grad and torch.is_grad_enabled()) and _cpu_kernel_direct(x):
            return torch.ops.butterfly_cpu.max_pool_cl(x, self.kernel_size, self.stride,
                                                       self.padding)
        return super().forward(x)


class FusedLinear(nn.Linear):
    """An ``nn.Linear`` for inference that may run ``butterfly_cpu::linear_rows`` (a classifier
    on a few rows: the output features split across the threads, where PyTorch reads the
    weight on one thread): with ``rows_kernel`` set (by :func:`butterfly.optimize_for_inference`,
    where it measures faster) and float32/float64 CPU input of at most :attr:`MAX_ROWS` rows
    that needs no gradients. Anything else runs ``nn.Linear``'s forward."""

    MAX_ROWS = 8
    rows_kernel = False   # set per layer by optimize_for_inference

    @classmethod
    def of(cls, linear: nn.Linear) -> "FusedLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.load_state_dict(linear.state_dict())
        return layer.requires_grad_(False).eval()   # an inference layer, as the fused convs

    def kernel_runs(self, x: Tensor) -> bool:
        """Whether the kernel computes ``self(x)`` (``rows_kernel`` aside)."""
        return x.dim() == 2 and x.shape[0] <= self.MAX_ROWS and \
            x.dtype in (torch.float32, torch.float64) and self.weight.dtype == x.dtype and \
            not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
            and _cpu_kernel_direct(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.rows_kernel and self.kernel_runs(x):
            return torch.ops.butterfly_cpu.linear_rows(x, self.weight, self.bias)
        return super().forward(x)


def _swap_linears(gm: fx.GraphModule) -> List[str]:
    """Makes every ``nn.Linear`` that receives a 2-d input in the example a
    :class:`FusedLinear` (its kernel off until measured); returns their names."""
    swapped = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Linear and \
                node.args and isinstance(node.args[0], fx.Node) and \
                len(_shape(node.args[0]) or ()) == 2:
            gm.add_submodule(node.target, FusedLinear.of(gm.get_submodule(node.target)))
            swapped.append(node.target)
    return swapped


def _swap_max_pools(gm: fx.GraphModule) -> List[str]:
    """Makes every ``nn.MaxPool2d`` the kernel computes a :class:`FusedMaxPool`; returns their
    names."""
    swapped = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.MaxPool2d and \
                FusedMaxPool.geometry(gm.get_submodule(node.target)) is not None:
            gm.add_submodule(node.target, FusedMaxPool.of(gm.get_submodule(node.target)))
            swapped.append(node.target)
    return swapped


def merge_separable(gm: fx.GraphModule) -> List[Tuple[str, str]]:
    """Merges every fused depthwise conv (no addition in its epilogue) whose only user is a
    :class:`FusedBFT` reading it as its input into one :class:`FusedDepthwiseBFT`, at the BFT's
    name (the layers become its ``dw`` and ``pw``); returns ``(block name, the depthwise conv's
    former name)`` pairs. ``gm``: a graph from :func:`fuse`."""
    merged = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), FusedBFT):
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        dw = gm.get_submodule(src.target)
        if not (isinstance(dw, FusedConv) and dw.kernel_geometry and not dw.adds):
            continue
        gm.add_submodule(node.target, FusedDepthwiseBFT(dw, gm.get_submodule(node.target)))
        node.args = (src.args[0],) + tuple(node.args[1:])
        gm.graph.erase_node(src)
        merged.append((node.target, src.target))
    if merged:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return merged


# ------------------------------------------------------------------------------------ the pass
_ACT_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                  F.hardsigmoid: "hardsigmoid", torch.relu_: "relu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class FusedLayer:
    """What the fusion pass did to one conv or BFT layer."""

    name: str
    kind: str                  # "BFT" or "conv"
    epilogue: str              # e.g. "bn+relu+add"
    in_channels: int
    out_channels: int


@dataclass
class FusionResult:
    """The fused model, what was fused, and what stayed (with the reason)."""

    model: fx.GraphModule
    fused: List[FusedLayer] = field(default_factory=list)
    unfused: List[Tuple[str, str]] = field(default_factory=list)   # (node, why it stayed)
    shuffles: List[str] = field(default_factory=list)   # cat nodes folded into concat_shuffle
    pools: List[str] = field(default_factory=list)   # max pools made FusedMaxPool
    linears: List[str] = field(default_factory=list)   # linear layers made FusedLinear


class _Tracer(fx.Tracer):
    """torch.fx's tracer with BFT layers, depthwise layers and already fused layers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_bft(m) or isinstance(m, (FusedBFT, FusedConv, FusedDepthwiseBFT,
                                           FusedMaxPool, DepthwiseConv2d)) or \
            super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as an ``fx.GraphModule`` whose BFT layers are single call nodes."""
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _next(gm: fx.GraphModule, node: fx.Node, chain: List[fx.Node]) -> Optional[fx.Node]:
    """The only user of ``node``, past ``nn.Identity`` layers (which join ``chain``)."""
    nxt = _only_user(node)
    while nxt is not None and nxt.op == "call_module" and \
            isinstance(gm.get_submodule(nxt.target), nn.Identity):
        chain.append(nxt)
        nxt = _only_user(nxt)
    return nxt


def _activation(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    if node.op == "call_module":
        return activation_of(gm.get_submodule(node.target))
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
        return _ACT_METHODS[node.target]
    return None


def _shape(node: fx.Node) -> Optional[torch.Size]:
    return getattr(node.meta.get("tensor_meta"), "shape", None)


def _addend(node: fx.Node, value: fx.Node) -> Optional[fx.Node]:
    """The other operand when ``node`` is ``value + other`` of the same shape, else None."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is value else a if b is value else None
    if not isinstance(other, fx.Node) or other is value:
        return None
    shape, other_shape = _shape(value), _shape(other)
    return other if shape is not None and shape == other_shape else None


def _bn_fold(bn: nn.BatchNorm2d) -> Optional[str]:
    """Why ``bn`` cannot be folded ('' when it can)."""
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm without running statistics normalises with batch statistics in eval"
    return ""


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """``(scale, shift)`` of an eval-mode BatchNorm: ``bn(y) = y * scale + shift``."""
    inv = torch.rsqrt(bn.running_var.detach() + bn.eps)
    scale = inv if bn.weight is None else bn.weight.detach() * inv
    shift = -bn.running_mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


@torch.fx.wrap
def concat_shuffle(a: Tensor, b: Tensor) -> Tensor:
    """``torch.cat((a, b), 1)`` followed by a channel shuffle of two groups (ShuffleNetV2's):
    output channel ``2j`` is ``a[:, j]`` and ``2j + 1`` is ``b[:, j]``, written in one pass, in
    ``a``'s memory format (channels_last on CPU: ``butterfly_cpu::interleave_channels``,
    ``csrc/graph/graph_ops_cpu.cpp``). The model's cat, view, transpose and reshape copy twice,
    and the reshape turns channels_last into NCHW."""
    if not a.is_contiguous() and _cpu_kernel_direct(a):   # channels_last (or a slice of it)
        return torch.ops.butterfly_cpu.interleave_channels(a, b)
    N, C, H, W = a.shape
    rows_a, rows_b = pixel_rows(a), pixel_rows(b)
    if rows_a is None or rows_b is None:   # NCHW, or mixed (a 1x1 image counts as both)
        return torch.stack((a, b), dim=2).reshape(N, 2 * C, H, W)
    # channels_last in PyTorch (inductor fuses this into one loop)
    out = torch.stack((rows_a.squeeze(2), rows_b.squeeze(2)), dim=2)
    return out.view(N, H, W, 2 * C).permute(0, 3, 1, 2)


def _method(node: fx.Node, name: str) -> bool:
    return node is not None and node.op == "call_method" and node.target == name


def _fold_channel_shuffles(gm: fx.GraphModule) -> List[str]:
    """Replaces every ``cat((a, b), 1) -> view(N, 2, C/2, H, W) -> transpose(1, 2) ->
    reshape(N, C, H, W)`` (the cat used by nothing else but its shape) with
    :func:`concat_shuffle`; returns the names of the cat nodes."""
    folded = []
    for cat in list(gm.graph.nodes):
        if cat.op != "call_function" or cat.target is not torch.cat:
            continue
        dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
        parts = cat.args[0]
        shapes = [_shape(p) if isinstance(p, fx.Node) else None for p in parts] \
            if isinstance(parts, (list, tuple)) else []
        if dim != 1 or len(shapes) != 2 or None in shapes or shapes[0] != shapes[1] or \
                len(shapes[0]) != 4:
            continue
        N, C, H, W = shapes[0]
        views = [u for u in cat.users if _method(u, "view")]
        others = [u for u in cat.users if u not in views]
        if len(views) != 1 or any(not (u.op == "call_function" and u.target is getattr)
                                  for u in others):
            continue
        view = views[0]
        transpose = _only_user(view)
        reshape = _only_user(transpose) if _method(transpose, "transpose") else None
        if not _method(reshape, "reshape") or tuple(transpose.args[1:]) not in ((1, 2), (2, 1)) \
                or _shape(view) != (N, 2, C, H, W) or _shape(reshape) != (N, 2 * C, H, W):
            continue
        with gm.graph.inserting_after(reshape):
            new = gm.graph.call_function(concat_shuffle, tuple(parts))
        new.meta = dict(reshape.meta)
        reshape.replace_all_uses_with(new)
        for n in (reshape, transpose, view):
            gm.graph.erase_node(n)
        folded.append(cat.name)
    return folded


def fuse(model: nn.Module, example_input) -> FusionResult:
    """A fused copy of ``model`` (eval mode) as an ``fx.GraphModule``, and what was fused; the
    model itself is not changed. ``example_input`` (a tensor or tuple of inputs) gives the shapes
    that decide which additions fuse."""
    gm = trace(copy.deepcopy(model).eval())
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    result, erased = FusionResult(gm), set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.name in erased:
            continue
        layer = gm.get_submodule(node.target)
        if isinstance(layer, nn.BatchNorm2d):
            why = _bn_fold(layer) or "BatchNorm after a layer that is not a conv or BFT"
            result.unfused.append((node.name, why))
        elif isinstance(layer, BFT) or (type(layer) in (nn.Conv2d, DepthwiseConv2d) and
                                        layer.padding_mode == "zeros"):
            erased |= _fuse_chain(gm, node, layer, result)
    result.shuffles = _fold_channel_shuffles(gm)
    result.pools = _swap_max_pools(gm)
    result.linears = _swap_linears(gm)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    return result


def _fuse_chain(gm: fx.GraphModule, node: fx.Node, layer: nn.Module,
                result: FusionResult) -> Set[str]:
    """Fuses the chain that starts at ``node``; returns the names of the nodes it removed."""
    chain, steps, bn = [node], [], None
    nxt = _next(gm, node, chain)
    if nxt is not None and nxt.op == "call_module" and \
            isinstance(gm.get_submodule(nxt.target), nn.BatchNorm2d):
        why = _bn_fold(gm.get_submodule(nxt.target))
        if why:
            nxt = None   # reported when the loop reaches the BatchNorm
        else:
            bn = gm.get_submodule(nxt.target)
            chain.append(nxt)
            steps.append("bn")
            nxt = _next(gm, nxt, chain)
    activation = _activation(gm, nxt) if nxt is not None else None
    if activation is not None:
        chain.append(nxt)
        steps.append(activation)
        nxt = _next(gm, nxt, chain)
    other = _addend(nxt, chain[-1]) if nxt is not None else None
    if other is not None:
        chain.append(nxt)
        steps.append("add")
    if not steps:
        return set()
    gm.add_submodule(node.target, _fused_module(layer, bn, activation or "none", other is not None))
    with gm.graph.inserting_after(chain[-1]):
        new = gm.graph.call_module(node.target, (node.args[0],) + ((other,) if other else ()))
    new.meta = dict(chain[-1].meta)   # its shape, for the chains that use it
    chain[-1].replace_all_uses_with(new)
    for n in reversed(chain):
        gm.graph.erase_node(n)
    channels = (layer.plan.in_channels, layer.plan.out_channels) if is_bft(layer) else \
        (layer.in_channels, layer.out_channels)
    result.fused.append(FusedLayer(node.target, "BFT" if is_bft(layer) else "conv",
                                   "+".join(steps), *channels))
    return {n.name for n in chain}


def _fused_module(layer: nn.Module, bn: Optional[nn.BatchNorm2d], activation: str,
                  adds: bool) -> nn.Module:
    """The layer with the BatchNorm ``bn`` (or none) folded in and the rest of its epilogue."""
    if not is_bft(layer):
        conv = layer if bn is None else fuse_conv_bn_eval(layer, bn)
        return FusedConv(conv, activation, adds)
    scale, shift = _bn_affine(bn) if bn is not None else (None, None)
    if layer.bias is not None:   # (B x + b) * scale + shift
        bias = layer.bias.detach()
        shift = bias * (1 if scale is None else scale) + (0 if shift is None else shift)
    return FusedBFT(layer, Epilogue(scale, shift, activation, adds))


def expose_submodules(model: nn.Module) -> None:
    """Make every submodule of ``model`` an ordinary instance attribute of its parent as well
    (it stays registered in ``_modules``). A fused graph's generated forward reaches each layer
    through an attribute chain (``getattr(self.blocks, "0").conv``); an ordinary attribute is
    found without ``nn.Module.__getattr__``'s walk through the parameter, buffer and module
    dictionaries, a few microseconds per layer call. Replacing a submodule by assignment
    (``setattr``, ``set_submodule``) drops the copy; call this after the last ``add_module``."""
    for module in model.modules():
        for name, child in module._modules.items():
            if child is not None:
                module.__dict__[name] = child


def is_fused(model: nn.Module) -> bool:
    """Whether ``model`` holds fused inference layers (the result of :func:`fuse`)."""
    return any(isinstance(m, (FusedBFT, FusedConv, FusedDepthwiseBFT)) for m in model.modules())


def dense_alternative(module: nn.Module) -> Optional[nn.Module]:
    """The dense layer equivalent to a :class:`FusedBFT` (or a plain BFT), for the measured choice
    between the two."""
    if isinstance(module, FusedBFT):
        return FusedConv.from_fused_bft(module)
    if is_bft(module):
        return dense_equivalent(module)
    return None

