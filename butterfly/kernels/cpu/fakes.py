"""Fake (meta) implementations of every ``butterfly_cpu::*`` C++ operator, for ``torch.compile``.

Registered once per process, right after the extension is loaded (the operators must exist).
Their outputs follow the kernels' memory-format rules, which the operators' own fake kernels in
:mod:`butterfly.ops` state.
"""
from __future__ import annotations

import torch

from ...ops import batch_norm_act, depthwise

_registered = False


def register_fake_kernels() -> None:
    """Register the fakes of all C++ operators (idempotent)."""
    global _registered
    if _registered:
        return
    ops = torch.ops.butterfly_cpu

    def fake(name: str):
        """register_fake for an operator the loaded library has (a partial build may lack some)."""
        if hasattr(ops, name.split("::")[1]):
            return torch.library.register_fake(name)
        return lambda fn: fn

    @fake("butterfly_cpu::forward")
    def _(x, weight, radices, out_channels, residual):
        return x.new_empty(x.shape[0], out_channels, x.shape[2])

    @fake("butterfly_cpu::backward")
    def _(grad, x, weight, radices, out_channels, residual):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    @fake("butterfly_cpu::forward_fused")
    def _(x, weight, radices, out_channels, residual, scale, shift, activation, add):
        return x.new_empty(x.shape[0], out_channels, x.shape[2])

    @fake("butterfly_cpu::interleave_channels")
    def _(a, b):
        N, C, H, W = a.shape
        return a.new_empty(N, 2 * C, H, W).contiguous(memory_format=torch.channels_last)

    def channels_last_image(x, channels, size, k, stride, padding):
        out = [(n + 2 * padding - k) // stride + 1 for n in size]
        return x.new_empty(x.shape[0], channels, *out).contiguous(
            memory_format=torch.channels_last)

    @fake("butterfly_cpu::max_pool_cl")
    def _(x, kernel_size, stride, padding):
        return channels_last_image(x, x.shape[1], x.shape[2:], kernel_size, stride, padding)

    @fake("butterfly_cpu::small_input_conv_cl")
    def _(x, weight, bias, stride, padding, activation):
        return channels_last_image(x, weight.shape[0], x.shape[2:], weight.shape[2], stride,
                                   padding)

    @fake("butterfly_cpu::linear_rows")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @fake("butterfly_cpu::dw_forward")
    def _(x, weight, bias, stride, activation):
        return depthwise.fake_forward(x, weight, stride)

    @fake("butterfly_cpu::dw_backward")
    def _(grad, x, weight, stride, output_mask):
        return depthwise.fake_backward(x, weight, output_mask)

    @fake("butterfly_cpu::bn_act_forward")
    def _(x, weight, bias, running_mean, running_var, momentum, eps, activation):
        return batch_norm_act.fake_forward(x)

    @fake("butterfly_cpu::bn_act_backward")
    def _(grad, x, y, weight, bias, mean, invstd, activation, output_mask):
        return batch_norm_act.fake_backward(x, output_mask)

    _registered = True
