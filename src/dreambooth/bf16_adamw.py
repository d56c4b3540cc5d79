"""AdamW for bf16 weights: the update is computed in fp32 and added with stochastic rounding.

Why: bf16 keeps 8 significant bits, so a weight near 0.05 can only move in steps of 2.4e-4. A
DreamBooth-sized AdamW update (lr ~1e-6, so |update| ~1e-6) is far below half that spacing, and
round-to-nearest returns the old weight every time: training silently does nothing.
Stochastic rounding rounds up with probability (x - down) / (up - down), so the stored weight is
x *in expectation* and a thousand tiny updates add up to what fp32 would have given (Gupta et al.
2015, "Deep Learning with Limited Numerical Precision"; Zamirai et al. 2020, "Revisiting
BFloat16 Training"). `tests/test_speed_modes.py` shows both halves of that claim.

The moments (exp_avg, exp_avg_sq) stay fp32 by default, so the memory per weight is 2 (weight) +
2 (gradient) + 8 (moments) bytes instead of 16; bf16 moments make it 2 + 2 + 4, and 8-bit moments
(bitsandbytes' blockwise quantization, as in its AdamW8bit) 2 + 2 + 2. The random bits come from torch's global RNG on the
weight's device, which every checkpoint saves, so a resumed run draws the same bits.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw


def stochastic_round_(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Write fp32 `source` into bf16 `target`, rounding to one of its two bf16 neighbours at random.

    bf16 is the top 16 bits of fp32. Adding a uniform random integer in [0, 2^16) to the fp32 bit
    pattern and clearing the low 16 bits rounds the magnitude up exactly when the random number
    exceeds the distance to the next bf16 value: up with probability (|x| - down) / ulp.
    """
    bits = source.float().view(torch.int32)  # same storage, fp32 bit pattern
    noise = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device)
    rounded = (bits + noise) & -65536  # -65536 == 0xFFFF0000: keep sign, exponent, 7 mantissa bits
    return target.copy_(rounded.view(torch.float32))  # exact: the dropped bits are zero


_DYNAMIC_MAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # 8-bit code books, per device


class AdamWStochasticRounding(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019, decoupled weight decay) for weights of any float dtype.

    The update is torch's own AdamW (its functional `adamw`, fused kernel on CPU and CUDA), so fp32
    weights are updated in place exactly as torch.optim.AdamW(fused=True) does. For bf16 weights
    the weight, gradient and moments are copied to fp32 a chunk at a time, the update is applied to the
    copy, and the result is written back with `stochastic_round_` (or round-to-nearest with
    `stochastic_rounding=False`, kept for the test that shows what it loses). State keys and
    layout match torch.optim.AdamW's ("step", "exp_avg", "exp_avg_sq").

    `moments_dtype=torch.bfloat16` stores the two moments in bf16 too (4 instead of 8 bytes per
    weight), read in fp32 and written back the same way: with beta2 = 0.999 each step changes
    exp_avg_sq by 0.1%, below bf16's resolution (0.4%), so it also needs stochastic rounding.

    `moments_dtype=torch.uint8` stores them 8-bit (2 bytes per weight for both): bitsandbytes'
    blockwise dynamic quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
    Quantization"), the storage of its AdamW8bit: one fp32 scale per 256 values, a signed dynamic map
    for exp_avg and an unsigned one for exp_avg_sq, and fp32 moments for tensors under
    MIN_8BIT_SIZE values. Each chunk is dequantized to fp32, updated by
    the same AdamW maths and quantized back; the weight still gets stochastic rounding.
    """

    QUANT_BLOCK = 256  # values per fp32 scale (bitsandbytes' AdamW8bit uses 256 too)
    # As bitsandbytes' min_8bit_size: smaller tensors (biases, norms) keep fp32 moments. Their
    # memory is negligible (SD 1.5: under 1% of the weights) and 8 bits hurt them most: on the
    # tiny model the guard's deviation was 0.0108 with them quantized.
    MIN_8BIT_SIZE = 4096

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, stochastic_rounding: bool = True, moments_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      stochastic_rounding=stochastic_rounding))
        self.moments_dtype = moments_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to each weight's dtype on load; the moments (and the 8-bit
        # moments' fp32 scales) keep their own dtype by design, so put the saved tensors back rather
        # than a recast copy.
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            for key, value in saved.items():
                if key != "step":
                    self.state[params[index]][key] = value.to(device=params[index].device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                moments_dtype = self.moments_dtype
                if moments_dtype == torch.uint8:
                    if p.numel() >= self.MIN_8BIT_SIZE:
                        self._step_8bit(group, p, state)
                        continue
                    moments_dtype = torch.float32
                if not state:  # as torch.optim.AdamW(fused=True) lays its state out
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=moments_dtype)
                stored = [p, state["exp_avg"], state["exp_avg_sq"], p.grad]
                if all(t.dtype == torch.float32 for t in stored):  # fp32: in place, exactly torch's AdamW
                    self._update(group, *stored, state["step"])
                    continue
                # Others go through fp32 copies, CHUNK elements at a time, so the temporaries stay
                # small however large the tensor (SD's token embedding has 38 M weights: unchunked,
                # its fp32 copies and rounding bits are ~0.9 GB. The CPU R15 peak turned out to lie
                # elsewhere - bench/RESULTS.md - but no step should need that much scratch).
                step = state["step"].clone()
                for pieces in self._chunks(stored):
                    weight, exp_avg, exp_avg_sq, grad = [t if t.dtype == torch.float32 else t.float() for t in pieces]
                    chunk_step = step.clone()  # each chunk takes the same step number
                    self._update(group, weight, exp_avg, exp_avg_sq, grad, chunk_step)
                    for target, value in zip(pieces[:3], (weight, exp_avg, exp_avg_sq)):
                        if value is not target:
                            if group["stochastic_rounding"]:
                                stochastic_round_(target, value)
                            else:
                                target.copy_(value)  # round-to-nearest
                state["step"].copy_(chunk_step)
        return loss

    CHUNK = 1 << 22  # elements per fp32 working copy (16 MB each); a multiple of QUANT_BLOCK

    def _step_8bit(self, group: dict, p: torch.Tensor, state: dict) -> None:
        """One AdamW step with 8-bit moments, CHUNK elements at a time (chunks start on block edges,
        so chunked and whole-tensor quantization are the same)."""
        import bitsandbytes.functional as bnbf

        n = p.numel()
        if not state:
            blocks = -(-n // self.QUANT_BLOCK)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for key in ("exp_avg", "exp_avg_sq"):  # all-zero codes with scale 0 dequantize to 0
                state[key] = torch.zeros(n, dtype=torch.uint8, device=p.device)
                state[key + "_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        if p.device not in _DYNAMIC_MAPS:  # shared: with fused_backward there is one optimizer per tensor
            _DYNAMIC_MAPS[p.device] = (bnbf.create_dynamic_map(signed=True).to(p.device),
                                       bnbf.create_dynamic_map(signed=False).to(p.device))
        codes = dict(zip(("exp_avg", "exp_avg_sq"), _DYNAMIC_MAPS[p.device]))
        # Logical-order flat views; a channels_last weight is copied and written back at the end.
        weight_flat, grad_flat = p.reshape(-1), p.grad.reshape(-1)
        step = state["step"].clone()
        for start in range(0, n, self.CHUNK):
            end = min(start + self.CHUNK, n)
            first, last = start // self.QUANT_BLOCK, -(-end // self.QUANT_BLOCK)
            moments = {key: (state[key][start:end], state[key + "_absmax"][first:last]) for key in codes}
            exp_avg, exp_avg_sq = [
                bnbf.dequantize_blockwise(q, absmax=absmax, code=codes[key], blocksize=self.QUANT_BLOCK)
                for key, (q, absmax) in moments.items()]
            weight, grad = weight_flat[start:end].float(), grad_flat[start:end].float()
            chunk_step = step.clone()
            self._update(group, weight, exp_avg, exp_avg_sq, grad, chunk_step)
            for key, value in zip(moments, (exp_avg, exp_avg_sq)):
                q, absmax = moments[key]
                bnbf.quantize_blockwise(value, code=codes[key], absmax=absmax, out=q, blocksize=self.QUANT_BLOCK)
            target = weight_flat[start:end]
            if target.dtype != torch.float32:  # bf16: back to 16 bits (an fp32 weight was updated in place)
                stochastic_round_(target, weight) if group["stochastic_rounding"] else target.copy_(weight)
        if weight_flat.data_ptr() != p.data_ptr():  # not a view (non-contiguous weight): write back
            p.copy_(weight_flat.view(p.shape))
        state["step"].copy_(chunk_step)

    @classmethod
    def _chunks(cls, tensors: list[torch.Tensor]):
        """Matching slices of same-shaped tensors; a non-contiguous set (channels_last) in one piece."""
        if not all(t.is_contiguous() for t in tensors):
            yield tensors
            return
        flat = [t.view(-1) for t in tensors]
        for start in range(0, flat[0].numel(), cls.CHUNK):
            yield [t[start:start + cls.CHUNK] for t in flat]

    @staticmethod
    def _update(group, weight, exp_avg, exp_avg_sq, grad, step) -> None:
        """torch's AdamW maths in one pass (its fused kernel on CPU and CUDA); increments `step`."""
        adamw([weight], [grad], [exp_avg], [exp_avg_sq], [], [step],
              fused=weight.device.type in ("cpu", "cuda"), amsgrad=False, beta1=group["betas"][0],
              beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=False)
