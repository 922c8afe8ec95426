"""Helpers shared by the conformance checks: naming the component, validating its ``Params``,
protocol attributes, seeding, and the shape / finiteness / dtype / gradient assertions."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

#: dtypes every component must follow on CPU.
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def where_of(slot: str, cls: type) -> str:
    return f"{slot} {getattr(cls, '__qualname__', cls)!r}"


def validated_params(cls: type, params: Any, who: str) -> Any:
    from pydantic import BaseModel

    p_cls = getattr(cls, "Params", None)
    assert isinstance(p_cls, type) and issubclass(p_cls, BaseModel), (
        f"{who}: needs a class attribute `Params` that is a pydantic BaseModel subclass (got {p_cls!r})"
    )
    if isinstance(params, Mapping):
        params = p_cls.model_validate(dict(params))
    assert isinstance(params, p_cls), f"{who}: params must be a {p_cls.__name__} (or a dict of its fields); got {type(params).__name__}"
    dumped = params.model_dump(mode="json")
    again = p_cls.model_validate(dumped)
    assert again == params, (
        f"{who}: params do not survive the YAML round trip Params.model_validate(params.model_dump(mode='json')): "
        f"{params!r} became {again!r}"
    )
    return params


def check_attrs(module: nn.Module, names: tuple[str, ...], who: str, kind: type = int) -> None:
    for name in names:
        assert hasattr(module, name), f"{who}: missing attribute `{name}` required by the protocol"
        value = getattr(module, name)
        assert isinstance(value, kind) and not isinstance(value, bool), (
            f"{who}: `{name}` must be a {kind.__name__}; got {value!r}"
        )
        if kind is int:
            assert value > 0 or name == "image_token_id", f"{who}: `{name}` must be positive; got {value}"


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_finite(out: torch.Tensor, who: str, what: str) -> None:
    assert bool(torch.isfinite(out.float()).all()), f"{who}: {what} holds NaN or inf"


def check_shape(out: Any, want: tuple[int, ...], who: str, what: str) -> None:
    assert isinstance(out, torch.Tensor), f"{who}: {what} must return a tensor; got {type(out).__name__}"
    assert tuple(out.shape) == want, f"{who}: {what} returned shape {tuple(out.shape)}, expected {want}"


def check_dtype_and_grads(module: nn.Module, run: Callable[[nn.Module, torch.dtype], torch.Tensor], who: str) -> None:
    for dtype in DTYPES:
        module.to(dtype).eval()
        with torch.no_grad():
            out = run(module, dtype)
        assert out.dtype == dtype, f"{who}: after .to({dtype}) with {dtype} input, output dtype is {out.dtype}"
        assert out.device.type == "cpu", f"{who}: output moved to {out.device} (input and module on cpu)"
        check_finite(out, who, f"{dtype} output")
    module.to(torch.float32).train()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if params:
        run(module, torch.float32).float().pow(2).mean().backward()
        dead = [n for n, p in params if p.grad is None]
        assert not dead, (
            f"{who}: parameters {dead[:6]} get no gradient from forward -- unused weights "
            "(e.g. a classifier head) would be reported as untrained for ever; don't build them"
        )
        module.zero_grad(set_to_none=True)
    module.eval()
