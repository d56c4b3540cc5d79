"""Optimizer and learning-rate schedule factories (plain if/elif, as k-diffusion's factories are)."""

from __future__ import annotations

from typing import Callable

import torch

from .config import OptimConfig
from .errors import DreamBoothError


MOMENTS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}


def import_bitsandbytes(needed_by: str, instead: str):
    """bitsandbytes, or a DreamBoothError naming the setting that needs it, the fix and the setting to use `instead`.

    Its 8-bit optimizers and blockwise quantization run on CUDA and, in recent releases (0.50.2
    here), on CPU; a build without kernels for this device is found by a 256-value quantization
    probe before training starts, not at the first optimizer step.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DreamBoothError(f"{needed_by} needs bitsandbytes: pip install bitsandbytes, or use {instead}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        bnb.functional.quantize_blockwise(torch.zeros(256, device=device), blocksize=256)
    except (NotImplementedError, RuntimeError) as err:
        raise DreamBoothError(f"{needed_by}: bitsandbytes {bnb.__version__} has no 8-bit kernels for {device} "
                              f"({type(err).__name__}); pip install -U bitsandbytes, or use {instead}") from None
    return bnb


def build_optimizer(param_groups: list[dict], optim: OptimConfig, weights_dtype: str = "fp32") -> torch.optim.Optimizer:
    """param_groups: [{"params": [...], "lr": ...}, ...] (UNet, then the text encoder with its own lr).

    With optim.fused_backward, one optimizer of the chosen kind per parameter, stepped from the
    backward pass (`OptimizerInBackward`); otherwise one optimizer over all groups.
    """
    # Checked once here, not in _build: with fused_backward that runs once per parameter.
    # (The config allows int8 moments only with bf16 weights, i.e. our AdamW.)
    if optim.optimizer == "adamw8bit":
        import_bitsandbytes("optim.optimizer=adamw8bit", "optim.optimizer=adamw")
    elif optim.moments_dtype == "int8":
        import_bitsandbytes("optim.moments_dtype=int8", "optim.moments_dtype=bf16")
    if optim.fused_backward:
        return OptimizerInBackward(param_groups, lambda groups: _build(groups, optim, weights_dtype))
    return _build(param_groups, optim, weights_dtype)


def _build(param_groups: list[dict], o: OptimConfig, weights_dtype: str) -> torch.optim.Optimizer:
    name = o.optimizer
    if name == "adamw" and weights_dtype == "bf16":
        from .bf16_adamw import AdamWStochasticRounding

        return AdamWStochasticRounding(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps,
                                       moments_dtype=MOMENTS_DTYPES[o.moments_dtype])
    if name == "adamw":
        # The fused kernel (CPU and CUDA) does the whole update in one pass over each tensor: measured
        # 4.2x faster than the default per-tensor loop on CPU (bench/RESULTS.md), same maths.
        kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps)
        try:
            return torch.optim.AdamW(param_groups, fused=True, **kwargs)
        except RuntimeError:  # a device or dtype without the fused kernel
            return torch.optim.AdamW(param_groups, **kwargs)
    if name == "adamw8bit":
        import bitsandbytes as bnb  # checked in build_optimizer
        return bnb.optim.AdamW8bit(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # External learning rate (the schedule drives it), not Adafactor's own relative step size.
        return Adafactor(param_groups, lr=o.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=o.weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise DreamBoothError("optim.optimizer=prodigy needs prodigyopt: pip install prodigyopt") from None
        # Prodigy estimates the step size itself; its authors recommend lr=1.0.
        return Prodigy(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    if name == "lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise DreamBoothError("optim.optimizer=lion needs lion-pytorch: pip install lion-pytorch") from None
        return Lion(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    raise DreamBoothError(f"unknown optim.optimizer {name!r}")


class OptimizerInBackward(torch.optim.Optimizer):
    """The optimizer step fused into the backward pass: one optimizer per parameter, stepped by a
    `register_post_accumulate_grad_hook` the moment that parameter's gradient is complete, which
    then frees the gradient. At most one parameter's gradient is alive at a time instead of all
    of them (for SD 1.5's UNet + text encoder in fp32: ~0.2 GB instead of 3.9 GB). The maths is
    the wrapped optimizer's, unchanged; it is the pattern of PyTorch's tutorial "How to save memory
    by fusing the optimizer step into the backward pass" and of torchtune's `optimizer_in_bwd`.

    To the recipe it looks like one optimizer:
    - `param_groups` are the per-parameter optimizers' own group dicts (the same objects), so the
      LR scheduler built on this object sets the learning rate of every one of them;
    - `state_dict()` / `load_state_dict()` hold every per-parameter state in parameter order, so
      checkpoints need nothing special;
    - `step()` and `zero_grad()` have nothing left to do: the work happened during backward.

    It cannot accumulate gradients over micro-batches, clip by the global norm, or wait for a
    distributed all-reduce: the config and the recipe refuse those combinations.
    """

    def __init__(self, param_groups: list[dict], build: Callable[[list[dict]], torch.optim.Optimizer]):
        self.optimizers = [build([{**group, "params": [p]}]) for group in param_groups for p in group["params"]]
        params = [opt.param_groups[0]["params"][0] for opt in self.optimizers]
        super().__init__(params, defaults={})
        self.param_groups = [opt.param_groups[0] for opt in self.optimizers]
        self.hooks = [p.register_post_accumulate_grad_hook(self._step_and_free(opt))
                      for p, opt in zip(params, self.optimizers)]

    @staticmethod
    def _step_and_free(optimizer: torch.optim.Optimizer):
        def hook(param: torch.Tensor) -> None:
            optimizer.step()
            param.grad = None

        return hook

    def step(self, closure=None):
        """Nothing to do: every parameter was stepped in the backward pass."""
        return None

    def state_dict(self) -> dict:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("per_parameter")
        if states is None or len(states) != len(self.optimizers):
            found = "a single optimizer's state" if states is None else f"{len(states)} per-parameter states"
            raise DreamBoothError(f"optimizer state does not fit optim.fused_backward=true with {len(self.optimizers)} "
                                  f"trainable tensors (found {found}): resume with the settings the checkpoint was made with")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
        # load_state_dict gives each optimizer new group dicts; share those with the scheduler again
        self.param_groups = [opt.param_groups[0] for opt in self.optimizers]

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    """diffusers' get_scheduler; stepped once per optimizer step (not per micro-batch or per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=optim.warmup_steps,
                         num_training_steps=max_steps)
