"""Hyperparameters that checkpoints can hold without pickling: components described as ``class_path`` /
``init_args`` (as LightningCLI writes them), so a checkpoint of a module built in Python loads with
``torch.load(weights_only=True)`` and ``load_from_checkpoint`` rebuilds its components."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
"""What ``load_from_checkpoint`` calls to rebuild a module from plain hyperparameters (jsonargparse, as the CLI)."""


class Configurable:
    """Remembers the arguments it was built with (``init_config``), so a checkpoint describes the object as
    ``class_path`` / ``init_args`` instead of pickling it. Subclasses need not call anything: ``__new__`` records."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Configurable:
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            return self  # __init__ will raise the same error with its own message
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(arguments)))  # self
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        self.__dict__["_init_arguments"] = arguments
        return self

    def __repr__(self) -> str:
        arguments = self.__dict__.get("_init_arguments")
        if arguments is None:
            return super().__repr__()
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"

    @property
    def init_config(self) -> dict[str, Any] | None:
        """``{"class_path": ..., "init_args": ...}`` with plain values, or None when an argument cannot be written
        as plain data."""
        arguments = self.__dict__.get("_init_arguments")
        if arguments is None:
            return None
        plain = {name: to_plain(value) for name, value in arguments.items()}
        if any(value is _UNDESCRIBABLE for value in plain.values()):
            return None
        return {"class_path": class_path(type(self)), "init_args": plain}


_UNDESCRIBABLE = object()


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def to_plain(value: Any) -> Any:
    """``value`` as data a checkpoint holds without pickling (None, numbers, strings, lists, dicts): a component as
    its ``init_config``, a dataclass as its fields, a function or class as its import path, a ``functools.partial``
    of a class (an optimizer factory) as class_path / init_args; ``_UNDESCRIBABLE`` for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [to_plain(v) for v in value]
        return _UNDESCRIBABLE if any(v is _UNDESCRIBABLE for v in items) else items
    if isinstance(value, dict):
        items = {str(k): to_plain(v) for k, v in value.items()}
        return _UNDESCRIBABLE if any(v is _UNDESCRIBABLE for v in items.values()) else items
    if isinstance(value, Configurable):
        config = value.init_config
        return _UNDESCRIBABLE if config is None else config
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        init_args = to_plain(value.keywords)
        return (
            _UNDESCRIBABLE
            if init_args is _UNDESCRIBABLE
            else {"class_path": class_path(value.func), "init_args": init_args}
        )
    if (inspect.isfunction(value) or isinstance(value, type)) and "<" not in value.__qualname__:
        return class_path(value)  # importable by name (not a lambda or a function defined inside another)
    return _UNDESCRIBABLE


def make_plain(module: Any) -> None:
    """Replace the objects among ``module``'s saved hyperparameters by their plain descriptions, and name the
    instantiator that rebuilds them; call right after ``save_hyperparameters()``.

    A module built by LightningCLI already holds the configuration the CLI parsed, and is left alone. An argument
    that cannot be described (a lambda, an object of a class that is not ``Configurable``) is saved as None, with a
    warning that says to pass it again to ``load_from_checkpoint``.
    """
    hparams = module.hparams
    if "_instantiator" in hparams:
        return
    lost = []
    for name, value in list(hparams.items()):
        plain = to_plain(value)
        if plain is _UNDESCRIBABLE:
            lost.append(name)
            plain = None
        hparams[name] = plain
    hparams["_instantiator"] = INSTANTIATOR
    module._hparams_initial = copy.deepcopy(hparams)  # what loggers record: the same plain data
    if lost:
        rank_zero_warn(
            f"{type(module).__name__}: {', '.join(lost)} cannot be written into checkpoints as plain data (a lambda, "
            "or an object whose class is not lit_rlhf.hparams.Configurable); checkpoints hold None there, so pass "
            f"them again to {type(module).__name__}.load_from_checkpoint(path, {lost[0]}=...)."
        )
