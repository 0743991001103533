"""The AIM wrapper: a mergekit ``MergeMethod`` around any registered method.

``aim_method("ties")`` returns (and registers, as ``aim_ties``) a method that
runs TIES unchanged, then relaxes each output tensor toward the base on the
input channels the base model uses most (with the one relaxation core,
:func:`mergekit_aim.relaxation.relax_tensor`). Its parameters are the inner
method's plus:

* ``omega`` — ω in [0, 1] (default 0.4, the paper's);
* ``importance`` — an :class:`~mergekit_aim.importance.ImportanceMap` or the
  path of an artifact (paths keep graph tasks hashable; loaded once per process);
* ``importance_key`` — the artifact key of this tensor's statistic, when it is
  not the output tensor's name (``slices:`` that move layers, a checkpoint
  tensor transformers renamed); for a stack of experts ``[E, out, in]`` a
  tuple with one key per expert (``None`` for an expert without a statistic):
  slice ``e`` is relaxed with expert ``e``'s statistic along its input axis.

A tensor with no statistic, or ω = 1, keeps the inner method's output.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import (
    BasePolicy,
    BatchOptions,
    MergeMethod,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import AfterValidator

from mergekit_aim.config import DEFAULT_OMEGA, PAPER_URL
from mergekit_aim.errors import AimConfigError
from mergekit_aim.importance import ImportanceMap, load_cached
from mergekit_aim.kernels import omega_value
from mergekit_aim.relaxation import has_statistic, relax_tensor

LOG = logging.getLogger(__name__)

PREFIX = "aim_"
AIM_PARAMETERS = ("omega", "importance", "importance_key")

_Omega = Annotated[float, AfterValidator(omega_value)]
_REGISTER_LOCK = threading.Lock()


class AimMergeMethod(MergeMethod):
    """Run ``inner`` and relax its outputs toward the base (AIM)."""

    def __init__(self, inner: MergeMethod):
        if isinstance(inner, AimMergeMethod):
            raise AimConfigError(f"{inner.spec.name} is already an AIM method")
        clash = {p.name for p in inner.spec.parameters} & set(AIM_PARAMETERS)
        if clash:
            raise AimConfigError(
                f"cannot wrap merge method {inner.spec.name!r}: its parameter(s) "
                f"{sorted(clash)} clash with AIM's"
            )
        if inner.spec.contract.base == BasePolicy.FORBIDDEN:
            raise AimConfigError(
                f"merge method {inner.spec.name!r} does not take a base model, so "
                f"AIM (which pulls the merge toward the base) cannot wrap it"
            )
        self.inner = inner
        pretty = inner.spec.pretty_name or inner.spec.name
        self.spec = MergeMethodSpec(
            name=PREFIX + inner.spec.name,
            parameters=inner.spec.parameters
            + (
                ParameterSpec("omega", _Omega, ParameterScope.SHARED, DEFAULT_OMEGA),
                ParameterSpec("importance", Any, ParameterScope.SHARED, None),
                ParameterSpec(
                    "importance_key",
                    str | tuple[str | None, ...] | None,
                    ParameterScope.SHARED,
                    None,
                ),
            ),
            contract=dataclasses.replace(inner.spec.contract, base=BasePolicy.REQUIRED),
            pretty_name=f"{pretty} + AIM",
            reference_url=PAPER_URL,
            optional_tensor_policy=inner.spec.optional_tensor_policy,
            uses_accelerator=inner.spec.uses_accelerator,
        )

    def _execute(
        self,
        groups: Sequence[TensorGroup],
        parameters: list[dict[str, Any]],
        options: BatchOptions,
        *,
        input_dtypes: Sequence[torch.dtype | None],
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, ...]:
        inner_names = {p.name for p in self.inner.spec.parameters}
        inner_parameters = [
            {k: v for k, v in p.items() if k in inner_names} for p in parameters
        ]
        merged = self.inner._execute(
            groups,
            inner_parameters,
            options,
            input_dtypes=input_dtypes,
            out_dtype=out_dtype,
        )
        return tuple(
            self._relax_group(group, result, params)
            for group, result, params in zip(groups, merged, parameters)
        )

    def _relax_group(
        self, group: TensorGroup, merged: torch.Tensor, params: dict[str, Any]
    ) -> torch.Tensor:
        omega = params["omega"]
        importance = _as_map(params["importance"], self.spec.name)
        key = params["importance_key"] or group.metadata.name
        if omega >= 1.0 or not has_statistic(importance, key):
            return merged
        if group.base is None:
            raise AimConfigError(
                f"{self.spec.name} needs the base model's {key} to relax it"
            )
        # The inner method's fresh result is relaxed where it lies, saving an
        # output-sized allocation per tensor; anything else is never written.
        return relax_tensor(
            group.metadata.name,
            group.base.tensor,
            merged,
            importance,
            key,
            float(omega),
            in_place=_owns_storage(merged, group),
        )


def _owns_storage(merged: torch.Tensor, group: TensorGroup) -> bool:
    """Whether ``merged`` is the whole of a storage no input of ``group`` uses.

    A method may return one of its inputs (or a view of one) unchanged; those
    must never be written. A tensor that is exactly its own contiguous storage
    and shares it with no input is the method's own new result.
    """
    if merged.requires_grad or not merged.is_contiguous():
        return False
    if merged.storage_offset() != 0:
        return False
    storage = merged.untyped_storage()
    if storage.nbytes() != merged.numel() * merged.element_size():
        return False
    pointer = storage.data_ptr()
    return all(
        entry.tensor.untyped_storage().data_ptr() != pointer for entry in group.entries
    )


def _as_map(importance: Any, method_name: str) -> ImportanceMap:
    if isinstance(importance, ImportanceMap):
        return importance
    if isinstance(importance, str):
        return load_cached(importance)
    if importance is None:
        raise AimConfigError(
            f"{method_name} needs importance=<ImportanceMap or artifact path> "
            f"(make one with `mergekit-aim calibrate BASE -o FILE`)"
        )
    raise AimConfigError(
        f"{method_name}: importance must be an ImportanceMap or a path; got "
        f"{type(importance).__name__}"
    )


def aim_method(inner: str | MergeMethod, *, register: bool = True) -> MergeMethod:
    """The AIM wrapper of a merge method, registered as ``aim_<name>``.

    Works for methods registered by other code after this package was imported:
    the wrapper is made on first request. Returns the registered wrapper when
    one exists for the same inner method.
    """
    if isinstance(inner, str):
        if inner.startswith(PREFIX):
            found = _registered(inner)
            if isinstance(found, AimMergeMethod):
                return found
        inner = merge_methods.get(inner)
    name = PREFIX + inner.spec.name
    with _REGISTER_LOCK:
        existing = _registered(name)
        if isinstance(existing, AimMergeMethod) and existing.inner is inner:
            return existing
        wrapper = AimMergeMethod(inner)
        if register:
            if existing is not None:
                raise AimConfigError(
                    f"merge method name {name!r} is taken by another method"
                )
            merge_methods.register(wrapper)
        return wrapper


def _registered(name: str) -> MergeMethod | None:
    try:
        return merge_methods.get(name)
    except RuntimeError:
        return None


__all__ = ["AimMergeMethod", "aim_method", "AIM_PARAMETERS"]
