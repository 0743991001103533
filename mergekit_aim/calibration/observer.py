"""The statistic: Σ|input| per input channel of every target module.

:class:`ChannelStatistics` attaches to each target (see
:mod:`~mergekit_aim.calibration.targets`) the hook its kind's strategy names
and adds, per forward pass, the sum of |x| over all tokens of the module's
input to a float32 accumulator on the input's own device, through the
``channel_abs_sum`` kernel, once per distinct input tensor (q/k/v projections
share one). Stacked experts (:data:`~mergekit_aim.calibration.targets.ROUTED_EXPERTS`)
get one hook per module that sums, per expert, the hidden-state rows routed to
it and its intermediate activation; it reads the per-expert token counts on the
host once per layer, as the experts' own forward pass does. Nothing else is
copied to the host until the end, and no activation outlives the forward
pass. Sums and token counts (not means) make results additive across
batches, ranks and runs; the statistic's name is
:data:`mergekit_aim.importance.STATISTIC`, which the artifact records.

An input holding inf or NaN (activations that overflowed a float16
calibration, say) would make its statistic meaningless: :meth:`first_non_finite`
names the first module in forward order with a non-finite sum, and
:meth:`non_finite_error` builds the :class:`CalibrationError` that says why
and which dtype to calibrate in instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_aim.calibration.targets import (
    DOWN,
    FIRST_INPUT,
    GATE_UP,
    ROUTED_EXPERTS,
    Target,
)
from mergekit_aim.errors import CalibrationError
from mergekit_aim.importance import STATISTIC


class StopForward(Exception):
    """Raised before the LM head's matmul: its input is all AIM needs."""


class ChannelStatistics:
    """Owns the hooks and accumulators of one calibration; always removes hooks.

    ``sums[i]`` and ``rows[i]`` are target ``i``'s Σ|x| per channel and the
    number of token rows summed. ``stop_at`` (the LM head) ends each forward
    pass with :class:`StopForward` once its input is measured.
    """

    statistic = STATISTIC

    def __init__(self, model: nn.Module, targets: list[Target], stop_at=None):
        self.model = model
        self.targets = targets
        self.sums: list[torch.Tensor | None] = [None] * len(targets)
        self.rows: list[int] = [0] * len(targets)
        self._stop_at = stop_at
        self._handles: list[Any] = []
        # The last input measured and its Σ|x|: sibling modules that read the
        # same tensor (q/k/v, gate/up projections) reuse the sum instead of
        # reducing the activation again.
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None
        # Target indices in the order their hooks first ran: named_modules()
        # lists a layer's norms after its projections, but an error must name
        # the first module the forward pass reached.
        self._order: list[int] = []
        self._seen = [False] * len(targets)

    def __enter__(self) -> ChannelStatistics:
        modules = dict(self.model.named_modules())
        try:
            for indices in self._hook_groups():
                module = modules[self.targets[indices[0]].module_name]
                self._handles.append(
                    self._observe(indices, module, module is self._stop_at)
                )
            if self._stop_at is not None and not any(
                modules[t.module_name] is self._stop_at for t in self.targets
            ):
                self._handles.append(
                    self._stop_at.register_forward_pre_hook(self._stop)
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None

    # --- hook strategies ----------------------------------------------------

    def _hook_groups(self) -> list[list[int]]:
        """Target indices that share one hook: each :data:`FIRST_INPUT` target
        alone; all :data:`ROUTED_EXPERTS` targets of one module together."""
        groups: list[list[int]] = []
        shared: dict[tuple[str, str], list[int]] = {}
        for index, target in enumerate(self.targets):
            if target.hook == ROUTED_EXPERTS:
                key = (target.module_name, target.hook)
                if key not in shared:
                    shared[key] = []
                    groups.append(shared[key])
                shared[key].append(index)
            else:
                groups.append([index])
        return groups

    def _observe(self, indices: list[int], module: nn.Module, stop: bool) -> Any:
        """Attach the hook the targets ``indices`` (one module's) declare;
        return its handle.

        The one dispatch point on :attr:`Target.hook`: a new strategy is a new
        case here plus its hook, which ends in :meth:`_accumulate`.
        """
        first = self.targets[indices[0]]
        strategy = first.hook
        if strategy == FIRST_INPUT:
            return module.register_forward_pre_hook(
                self._first_input_hook(indices[0], stop), with_kwargs=True
            )
        if strategy == ROUTED_EXPERTS:
            return module.register_forward_pre_hook(
                self._routed_experts_hook(indices), with_kwargs=True
            )
        raise CalibrationError(
            f"module {first.module_name}: no observer for hook strategy {strategy!r}"
        )

    def _first_input_hook(self, index: int, stop: bool):
        target = self.targets[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._reached(index)
            x = _first_tensor(args, kwargs)
            if x is None or x.shape[-1] != target.channels:
                raise CalibrationError(
                    f"module {target.module_name} ({type(module).__name__}) got "
                    f"input of shape {None if x is None else tuple(x.shape)}; "
                    f"expected {target.channels} channels in the last dimension"
                )
            # Shapes are host-side metadata: counting rows never syncs a device.
            self._accumulate(index, self._abs_sum(x), x.numel() // target.channels)
            if stop:
                raise StopForward

        return hook

    def _routed_experts_hook(self, indices: list[int]):
        """Per expert: Σ|x| over the hidden-state rows routed to it (gate/up
        input) and over its intermediate activation ``act(gate) * up`` (down
        input), computed from the module's own weights as its forward does."""
        by_expert: dict[int, dict[str, int]] = {}
        for index in indices:
            target = self.targets[index]
            by_expert.setdefault(target.expert, {})[target.role] = index
        module_name = self.targets[indices[0]].module_name
        measures_down = any(DOWN in roles for roles in by_expert.values())

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, routing = _expert_arguments(args, kwargs)
            gate_up = module.gate_up_proj
            num_experts, _, channels = gate_up.shape
            if hidden is None or routing is None or hidden.shape[-1] != channels:
                got_x = None if hidden is None else tuple(hidden.shape)
                got_k = None if routing is None else tuple(routing.shape)
                raise CalibrationError(
                    f"module {module_name} ({type(module).__name__}) got hidden "
                    f"states {got_x} and expert indices {got_k}; expected "
                    f"[tokens, {channels}] and [tokens, top_k]"
                )
            for index in indices:
                self._reached(index)
            weight = module.gate_up_proj
            # Measure where the experts' weights are (accelerate moves the
            # inputs there only after pre-hooks run); offloaded weights come
            # to the input's device instead.
            device = hidden.device if weight.device.type == "meta" else weight.device
            x = hidden.detach().reshape(-1, channels).to(device)
            routing = routing.reshape(x.shape[0], -1).to(device)
            if measures_down:
                gate_up = _resident(module, "gate_up_proj", device)
            # Every (token, expert) routing pair, grouped by expert: one sort
            # and one host read of the per-expert counts for the whole layer.
            # Indices past the last expert (expert parallelism's sentinels)
            # belong to no expert here.
            experts = routing.reshape(-1)
            tokens = torch.arange(x.shape[0], device=device).repeat_interleave(
                routing.shape[1]
            )
            valid = experts < num_experts
            experts, tokens = experts[valid], tokens[valid]
            order = torch.argsort(experts, stable=True)
            counts = torch.bincount(experts, minlength=num_experts).tolist()
            routed = x.index_select(0, tokens[order]).split(counts)
            for expert, (count, x_e) in enumerate(zip(counts, routed)):
                roles = by_expert.get(expert)
                if not count or not roles:
                    continue
                if GATE_UP in roles:
                    self._accumulate(roles[GATE_UP], _channel_abs_sum(x_e), count)
                if DOWN in roles:
                    inner = module._apply_gate(F.linear(x_e, gate_up[expert]))
                    self._accumulate(roles[DOWN], _channel_abs_sum(inner), count)

        return hook

    @staticmethod
    def _stop(module: nn.Module, args: Any) -> None:
        raise StopForward

    # --- accumulation (shared by every strategy) ----------------------------

    def _reached(self, index: int) -> None:
        if not self._seen[index]:
            self._seen[index] = True
            self._order.append(index)

    def _accumulate(self, index: int, total: torch.Tensor, rows: int) -> None:
        """Add one input's Σ|x| per channel, over ``rows`` token rows."""
        acc = self.sums[index]
        if acc is None:
            # The first batch's sum becomes the accumulator: no zeros to add.
            self.sums[index] = total.clone()
        else:
            if acc.device != total.device:
                acc = self.sums[index] = acc.to(total.device)
            acc.add_(total)
        self.rows[index] += rows

    def _abs_sum(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        total = _channel_abs_sum(x.detach())
        # Holding x until the next distinct input costs no memory the forward
        # pass does not hold anyway, and keeps its identity from being reused.
        self._last = (x, x._version, total)
        return total

    # --- non-finite input ---------------------------------------------------

    def first_non_finite(
        self, sums: list[torch.Tensor | None] | None = None
    ) -> int | None:
        """Index of the first target, in forward order, whose sum is inf or NaN.

        Checks ``sums`` (default: this run's accumulators). A non-finite input
        leaves its module's sum non-finite for good (|x| sums never cancel), so
        a check of the accumulators after a batch covers every batch so far. It
        costs one concatenation, one maximum and one host sync per device the
        sums live on, about a millisecond a batch on CPU for Gemma-3-270M's 235
        sums: they are non-negative, so their maximum is finite exactly when all
        are (NaN propagates through it), and a maximum is cheaper than testing
        every element with ``isfinite``.
        """
        sums = self.sums if sums is None else sums
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for acc in sums:
            if acc is not None:
                by_device.setdefault(acc.device, []).append(acc)
        if all(
            bool(torch.cat(group).amax().isfinite()) for group in by_device.values()
        ):
            return None
        unseen = [i for i in range(len(self.targets)) if not self._seen[i]]
        for index in (*self._order, *unseen):
            acc = sums[index]
            if acc is not None and not bool(torch.isfinite(acc).all()):
                return index
        return None

    def non_finite_error(self, index: int) -> CalibrationError:
        """The error for target ``index`` having received inf or NaN input."""
        return non_finite_error(self.model, self.targets[index])


def _resident(module: nn.Module, name: str, device: torch.device) -> torch.Tensor:
    """Parameter ``name`` of ``module`` with its values (on ``device`` when
    they are read from an offload hook).

    Under offload (``max_memory``) accelerate keeps an offloaded module's
    weights on the meta device and loads them inside the module's wrapped
    forward, after forward pre-hooks have run; the values are then read from
    the offload hook's weights map, as that forward would read them.
    """
    weight = getattr(module, name)
    if weight.device.type != "meta":
        return weight
    hook = getattr(module, "_hf_hook", None)
    for candidate in (hook, *getattr(hook, "hooks", ())):
        weights = getattr(candidate, "weights_map", None)
        if weights is not None and name in weights:
            return weights[name].to(device=device, dtype=weight.dtype)
    raise CalibrationError(
        f"module {type(module).__name__}: parameter {name} is on the meta device "
        f"and no offload hook holds its values"
    )


def _channel_abs_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ|x| per channel (last dimension) in float32."""
    from mergekit_aim.kernels import channel_abs_sum

    # On CUDA the custom op dispatches to Triton; on CPU calling the torch
    # kernel directly saves the dispatcher's ~50 µs per call.
    backend = "auto" if x.device.type == "cuda" else "torch"
    return channel_abs_sum(x, backend=backend)


#: The stacked experts' forward signature in transformers.
_EXPERT_ARGUMENTS = ("hidden_states", "top_k_index", "top_k_weights")


def _expert_arguments(
    args: tuple, kwargs: dict
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``hidden_states`` and ``top_k_index``, given positionally or by name."""
    bound = dict(zip(_EXPERT_ARGUMENTS, args))
    for name in _EXPERT_ARGUMENTS:
        if name in kwargs:
            bound[name] = kwargs[name]
    hidden, routing = bound.get("hidden_states"), bound.get("top_k_index")
    if not isinstance(hidden, torch.Tensor) or not isinstance(routing, torch.Tensor):
        return None, None
    return hidden, routing


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


# Calibration dtypes an overflow of each narrower dtype can be avoided in, the
# one to suggest first leading (bfloat16 has float32's range at half the memory).
_WIDER_DTYPES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float16: ("bfloat16", "float32"),
    torch.bfloat16: ("float32",),
}


def non_finite_error(model: nn.Module, target: Target) -> CalibrationError:
    """Why ``target`` received inf or NaN input, and what to calibrate in instead."""
    dtype = _model_dtype(model)
    name = str(dtype).removeprefix("torch.")
    where = (
        f"module {target.module_name} (tensor {target.tensor_name}) was the first, "
        f"in forward order, to receive non-finite input (inf or NaN) while "
        f"calibrating in {name}"
    )
    weight = _first_non_finite_parameter(model)
    cause = (
        f"; the model's weight {weight} is itself inf or NaN in {name}"
        if weight is not None
        else ""
    )
    if dtype in _WIDER_DTYPES:
        wider = _WIDER_DTYPES[dtype]
        return CalibrationError(
            f"{where}: the activations overflowed {name} (largest finite value "
            f"{torch.finfo(dtype).max:g}) in or before this module{cause}. "
            f"Calibrate in a wider dtype: "
            + " or ".join(f"--dtype {w}" for w in wider)
            + f" (in the aim: block, calibration: {{dtype: {wider[0]}}})."
        )
    return CalibrationError(
        f"{where}{cause}: no calibration dtype is wider than {name}; check the "
        f"base model's weights and the calibration data for values that overflow"
    )


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was loaded in (what ``--dtype`` chose)."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _first_non_finite_parameter(model: nn.Module) -> str | None:
    # Only on the error path: it reads every resident weight once. Offloaded
    # weights (on the meta device) are not in memory to check.
    for name, param in model.named_parameters():
        if (
            param.is_floating_point()
            and param.device.type != "meta"
            and not bool(torch.isfinite(param).all())
        ):
            return name
    return None
