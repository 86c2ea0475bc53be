"""Adam's state of each model parameter, wherever DeepSpeed keeps it.

Where the state lives depends on the configuration. ZeRO 0 in fp32 hands Kiln's optimizer the
model's own parameters, and its state is keyed by them. ZeRO 1 and 2 (and DeepSpeed's bf16
optimizer) flatten fp32 copies of the parameters and partition them across the data-parallel
ranks; ZeRO 3 partitions the parameters themselves. `OptimizerState` hides the difference: for
any parameter of this rank's module it reads and writes the whole (this tensor-parallel rank's)
fp32 master weight, `exp_avg` and `exp_avg_sq`: `fragment` gives the part this rank holds,
without communication (what checkpoints write and read); `read` gathers the whole tensor
through DeepSpeed's `safe_get_full_*` functions, collectively over the data-parallel group
(every rank of the group must read the same parameters in the same order).
"""

from __future__ import annotations

import torch
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "master"


class UnsupportedOptimizer(RuntimeError):
    """An optimizer wrapper whose per-parameter state Kiln cannot address."""


class OptimizerState:
    """Per-parameter access to the optimizer state of one DeepSpeed engine."""

    def __init__(self, engine) -> None:
        self.base: torch.optim.Optimizer = engine.basic_optimizer
        self.wrapper = engine.optimizer
        self.partitioned = self.wrapper is not self.base
        self.flat = self._flat_parameters() if self.partitioned else None
        if self.partitioned and self.has_moments():
            self._link()

    def _link(self) -> None:
        """Point each parameter's fragment at the flat Adam state. ZeRO 1/2 link once, after
        the first parameter group's first step, when the other groups hold no state yet:
        linking again now that every group has its state makes all of them readable."""
        if hasattr(self.wrapper, "_lazy_init_hp_params_optimizer_state"):
            self.wrapper._hp_optimizer_states_linked = False
            self.wrapper._lazy_init_hp_params_optimizer_state()

    def _flat_parameters(self) -> list[tuple[torch.Tensor, dict]]:
        """The fp32 tensors the base optimizer steps, with their parameter group."""
        wrapper, groups = self.wrapper, self.base.param_groups
        if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO 3 (sub-groups)
            return [
                (flat, groups[wrapper.sub_group_to_group_id[i]])
                for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat)
            ]
        for attribute in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            if hasattr(wrapper, attribute):  # ZeRO 1/2, DeepSpeed's bf16 optimizer
                return list(zip(getattr(wrapper, attribute), groups, strict=True))
        raise UnsupportedOptimizer(
            f"{type(wrapper).__name__}: Kiln cannot read its per-parameter optimizer state "
            "(fp16 without ZeRO); use parallel.zero_stage >= 1"
        )

    # -- the step count ------------------------------------------------------------------
    def _states(self) -> list[dict]:
        tensors = [t for t, _ in self.flat] if self.partitioned else self._own_parameters()
        return [self.base.state[t] for t in tensors if t in self.base.state]

    def _own_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.base.param_groups for p in group["params"]]

    def has_moments(self) -> bool:
        """Whether Adam has taken a step (before that it holds no state)."""
        states = self._states()
        return bool(states) and all("exp_avg" in s for s in states)

    def step_count(self) -> int:
        steps = {int(float(s["step"])) for s in self._states() if "step" in s}
        if len(steps) != 1:
            raise RuntimeError(f"optimizer step counts differ across parameters: {steps}")
        return steps.pop()

    def create(self, step: int) -> None:
        """Zero moments at Adam step `step` for every tensor the optimizer steps, linked to
        the parameters, as the first real step would have made them; then `write` fills them."""
        if self.partitioned:
            pairs = self.flat
        else:
            pairs = [(p, g) for g in self.base.param_groups for p in g["params"]]
        for tensor, group in pairs:
            self.base.state[tensor] = {
                "step": self._step_value(step, tensor, group),
                "exp_avg": torch.zeros_like(tensor),
                "exp_avg_sq": torch.zeros_like(tensor),
            }
        self._link()

    def _step_value(self, step: int, tensor: torch.Tensor, group: dict):
        if isinstance(self.base, torch.optim.Adam | torch.optim.AdamW):
            on_device = group.get("fused") or group.get("capturable")
            return torch.tensor(float(step), device=tensor.device if on_device else "cpu")
        return step  # DeepSpeed's FusedAdam counts in a Python int

    # -- this rank's part of each parameter's state (no communication) --------------------
    def fragment(self, parameter: nn.Parameter, key: str | None) -> tuple[int, torch.Tensor] | None:
        """(start, flat): the part of the parameter's fp32 `key` state (None: the fp32 master
        weights) this rank holds, as the flat range [start, start + numel) of the whole
        (TP-rank) tensor, and a 1-D view of the live state; None when it holds none."""
        if not self.partitioned:
            target = parameter if key is None else self.base.state[parameter][key]
            return 0, target.data.view(-1)
        if hasattr(parameter, "ds_id"):  # ZeRO 3: one partition of every parameter per rank
            zero3 = parameter._z3_optimizer
            local, _ = zero3._get_fp32_opt_state_partition(parameter, False, key)
            start = zero3._get_param_partition_rank(parameter) * parameter.ds_tensor.ds_numel
            numel = max(0, min(local.numel(), parameter.ds_numel - start))  # drop the padding
            return (start, local.narrow(0, 0, numel)) if numel else None
        mapping = getattr(parameter, "_hp_mapping", None)  # ZeRO 1/2, DeepSpeed's bf16
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment(key)

    # -- per-parameter tensors -----------------------------------------------------------
    def read(self, parameter: nn.Parameter, key: str) -> torch.Tensor:
        """The whole fp32 `key` (exp_avg, exp_avg_sq or master) of this parameter."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if not self.partitioned:
            value = parameter if key == MASTER else self.base.state[parameter][key]
        elif key == MASTER:
            value = safe_get_full_fp32_param(parameter)
        else:
            value = safe_get_full_optimizer_state(parameter, key)
        if value is None:
            raise UnsupportedOptimizer(f"no {key} for a parameter of shape {parameter.shape}")
        return value.detach().float().reshape(full_shape(parameter))


def full_shape(parameter: nn.Parameter) -> torch.Size:
    """This TP rank's shape of a parameter, also when ZeRO 3 has partitioned it away."""
    return getattr(parameter, "ds_shape", parameter.shape)
