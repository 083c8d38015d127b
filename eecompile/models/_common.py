"""Shared helpers for the reference model zoo: seeding and weight perturbation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

NOISE_STD: float = 0.02
"""Standard deviation of the Gaussian noise added to every parameter and buffer."""

M = TypeVar("M", bound=nn.Module)


def seeded_build(ctor: Callable[[], M], seed: int) -> M:
    """Construct ``ctor()`` under a private, seeded RNG (global RNG state is preserved)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ctor()


def perturb_(
    module: nn.Module,
    seed: int,
    std: float = NOISE_STD,
    skip_buffers: Iterable[str] = (),
) -> nn.Module:
    """Add ``std * N(0, 1)`` noise in place to every floating-point parameter and buffer.

    This makes norm gains differ from one, biases differ from zero and, with overwhelming
    probability, every initializer of the exported graph distinct from every other one.
    BatchNorm running statistics are additionally randomised (mean ~ N(0, 0.1^2), variance
    ~ U(0.5, 1.5)) so that the folded affine maps are non-trivial; running variances stay
    strictly positive.  Buffers whose *local* name is in ``skip_buffers`` (e.g. a RoPE
    ``inv_freq`` table, which defines the positional encoding rather than being a learned
    weight) are left untouched.
    """
    skip = set(skip_buffers)
    gen = torch.Generator().manual_seed(10_007 * seed + 12_345)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                assert mod.running_var is not None
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=gen))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=gen))
            for _, p in mod.named_parameters(recurse=False):
                if p.is_floating_point():
                    p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            for bname, b in mod.named_buffers(recurse=False):
                if bname in skip or b is None or not b.is_floating_point():
                    continue
                b.add_(std * torch.randn(b.shape, generator=gen, dtype=b.dtype))
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and bname == "running_var":
                    b.clamp_(min=0.05)
    return module
