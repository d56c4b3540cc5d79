"""Check an export by loading it back through an independent path and running the networks.

`probe` runs one module on fixed-seed inputs shaped from its own config (a UNet gets a latent, a
timestep, text states and, where its config asks, SDXL's size/pool embedding or class labels; a
text encoder gets token ids and returns every hidden state; a VAE decodes a latent). `compare`
runs the same probe on two modules and reports the largest difference per output, so a wrong
config (an attention head count, a linear vs conv projection) fails even when every tensor loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Verification:
    """What was compared and how far apart the outputs were; `problems` is empty when it passed."""

    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    failed_files: set[str] = field(default_factory=set)  # export files that did not load back the same

    def add(self, what: str, diff: float, limit: float, file: str = "") -> None:
        self.checks.append(f"{what}: max abs diff {diff:.3g}" + (" (bitwise)" if diff == 0 else f" (limit {limit:.2g})"))
        if not diff <= limit:  # also catches NaN
            self.fail(f"{what} differs by {diff:.3g} (limit {limit:.2g})", file)

    def fail(self, problem: str, file: str = "") -> None:
        self.problems.append(problem)
        if file:
            self.failed_files.add(file)

    def summary(self) -> str:
        return "; ".join(self.checks)


def _inputs(module, generator: torch.Generator) -> tuple[str, dict]:
    config = module.config
    dtype = next(module.parameters()).dtype
    device = next(module.parameters()).device

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if hasattr(config, "vocab_size"):  # a text encoder (transformers config); T5 has no position limit
        length = getattr(config, "max_position_embeddings", 16)
        ids = torch.randint(0, config.vocab_size, (2, length), generator=generator).to(device)
        return "text", {"input_ids": ids, "output_hidden_states": True}
    if "latent_channels" in config:  # a VAE: decode a small latent
        return "vae", {"z": randn(1, config["latent_channels"], 4, 4)}
    kwargs = {"sample": randn(1, config["in_channels"], 8, 8), "timestep": torch.tensor([500], device=device),
              # IF's UNet takes T5 states (encoder_hid_dim) and projects them to its cross-attention width
              "encoder_hidden_states": randn(1, 6, config.get("encoder_hid_dim") or config["cross_attention_dim"])}
    if config.get("addition_embed_type") == "text_time":  # SDXL: 6 size/crop ids + the pooled text embedding
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": randn(1, pooled), "time_ids": randn(1, 6) * 100}
    if config.get("num_class_embeds") or config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([20], device=device)
    return "unet", kwargs


@torch.no_grad()
def _run(module, seed: int) -> list[torch.Tensor]:
    kind, kwargs = _inputs(module, torch.Generator().manual_seed(seed))
    training, wrapper = module.training, module.__dict__.get("forward")
    module.eval()  # no dropout (a LoRA's included): the probe must be deterministic
    if "_original_forward" in module.__dict__:  # accelerate's mixed-precision wrapper: probe the network itself
        module.forward = module._original_forward
    try:
        if kind == "vae":
            return [module.decode(**kwargs).sample.float().cpu()]
        out = module(**kwargs)
    finally:
        module.train(training)
        if wrapper is not None:
            module.forward = wrapper
    if kind == "unet":
        return [out.sample.float().cpu()]
    tensors = list(out.hidden_states) + [out.last_hidden_state]
    extra = getattr(out, "text_embeds", None)  # SDXL's projected pool
    return [t.float().cpu() for t in tensors + ([extra] if extra is not None else [])]


def compare(report: Verification, what: str, reference, candidate, relative: float = 0.0, file: str = "",
            seed: int = 0) -> None:
    """Run both modules on the same inputs; record the largest difference over every output. It may
    be at most `relative` x the reference's largest output magnitude."""
    a, b = _run(reference, seed), _run(candidate, seed)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        report.fail(f"{what}: outputs have different shapes", file)
        return
    scale = max(1.0, max(x.abs().max().item() for x in a))
    report.add(what, max((x - y).abs().max().item() for x, y in zip(a, b)), relative * scale, file)


FP32 = 1e-5  # relative. The same fp32 weights can still differ in the last bits of an output: CPU and GPU
# kernels choose code paths by memory alignment and size. Weights themselves are compared bitwise.
HALF = 1e-2  # fp16/bf16 weights: their rounding (2^-11 / 2^-8 relative) moves outputs by about that


def tolerance(*modules) -> float:
    """FP32 when every weight is fp32 and all run on one device; else HALF (another device's kernels
    round differently, as half precision does)."""
    params = [p for m in modules for p in m.parameters()]
    same = all(p.dtype == torch.float32 for p in params) and len({p.device for p in params}) == 1
    return FP32 if same else HALF


def same_weights(report: Verification, what: str, reference, candidate, file: str = "") -> None:
    """Every tensor of the state dicts bitwise equal (the same layout on both sides)."""
    a, b = reference.state_dict(), candidate.state_dict()
    differ = [k for k in a if k not in b or a[k].shape != b[k].shape or not torch.equal(a[k].to(b[k].dtype), b[k])]
    if differ or a.keys() != b.keys():
        report.fail(f"{what}: {len(differ) or len(set(b) - set(a))} weight(s) differ, e.g. {(differ or sorted(set(b) - set(a)))[0]}", file)
    else:
        report.checks.append(f"{what}: all {len(a)} weights bitwise equal")
