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

    def add(self, what: str, diff: float, limit: float) -> None:
        self.checks.append(f"{what}: max abs diff {diff:.3g}" + (" (bitwise)" if diff == 0 else f" (limit {limit:.1g})"))
        if not diff <= limit:  # also catches NaN
            self.problems.append(f"{what} differs by {diff:.3g} (limit {limit:.1g})")

    def summary(self) -> str:
        return "; ".join(self.checks)


def _inputs(module, generator: torch.Generator) -> tuple[str, dict]:
    config = module.config
    dtype = next(module.parameters()).dtype
    device = next(module.parameters()).device

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if hasattr(config, "vocab_size"):  # a text encoder (transformers config)
        ids = torch.randint(0, config.vocab_size, (2, config.max_position_embeddings), generator=generator).to(device)
        return "text", {"input_ids": ids, "output_hidden_states": True}
    if "latent_channels" in config:  # a VAE: decode a small latent
        return "vae", {"z": randn(1, config["latent_channels"], 4, 4)}
    kwargs = {"sample": randn(1, config["in_channels"], 8, 8), "timestep": torch.tensor([500], device=device),
              "encoder_hidden_states": randn(1, 6, config["cross_attention_dim"])}
    if config.get("addition_embed_type") == "text_time":  # SDXL: 6 size/crop ids + the pooled text embedding
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": randn(1, pooled), "time_ids": randn(1, 6) * 100}
    if config.get("num_class_embeds") or config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([20], device=device)
    return "unet", kwargs


@torch.no_grad()
def _run(module, seed: int) -> list[torch.Tensor]:
    kind, kwargs = _inputs(module, torch.Generator().manual_seed(seed))
    if kind == "vae":
        return [module.decode(**kwargs).sample.float()]
    out = module(**kwargs)
    if kind == "unet":
        return [out.sample.float()]
    tensors = list(out.hidden_states) + [out.last_hidden_state]
    extra = getattr(out, "text_embeds", None)  # SDXL's projected pool
    return [t.float() for t in tensors + ([extra] if extra is not None else [])]


def compare(report: Verification, what: str, reference, candidate, limit: float = 0.0, seed: int = 0) -> None:
    """Run both modules on the same inputs; record the largest difference over every output."""
    a, b = _run(reference, seed), _run(candidate, seed)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        report.problems.append(f"{what}: outputs have different shapes")
        return
    report.add(what, max((x - y).abs().max().item() for x, y in zip(a, b)), limit)


def tolerance(module) -> float:
    """0 for fp32 (the same weights and ops must give the same bits); half precision's rounding otherwise."""
    return 0.0 if next(module.parameters()).dtype == torch.float32 else 2e-2
