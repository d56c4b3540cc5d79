"""Decide what trains: all denoiser weights or LoRA adapters (peft), and any text encoders asked for.

Full fine-tuning and LoRA share the whole recipe; they differ only here and in what `export`
writes. LoRA layers are peft's (`LoraConfig` + diffusers'/transformers' `add_adapter`), never our
own. Adapters use peft's "gaussian" init for A and zeros for B, so the adapted model's output
equals the base model's output at step 0 (Hu et al. 2021, LoRA: W0 x + (alpha / r) B A x).
Which modules exist and which are text encoders is the family's business (`ModelFamily`); each
text encoder trains under its own config section (text_encoder, text_encoder_2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import LoRAConfig, TextEncoderConfig
from ..errors import DreamBoothError
from .family import Components


@dataclass
class Trainable:
    """Parameters the optimizer updates, by module (denoiser first), with stable names for checkpoints."""

    params: dict[str, dict[str, torch.nn.Parameter]]  # module name -> parameter name -> parameter
    # module -> name of its token-embedding table when only the identifier's rows of it train, in a group of their own
    identifier_embeddings: dict[str, str] = field(default_factory=dict)
    adapted: list[str] = field(default_factory=list)  # modules that carry LoRA adapters (what a LoRA export holds)
    identifiers: tuple[str, ...] = ()  # the concepts' identifiers whose embedding rows train (identifier_embeddings)
    frozen: set[str] = field(default_factory=set)  # trained modules that sit out the current step (`set_frozen`)

    @property
    def modules(self) -> list[str]:
        """Modules that have trainable parameters, in optimizer-group order."""
        return [name for name, params in self.params.items() if params]

    def named(self) -> dict[str, torch.nn.Parameter]:
        return {f"{module}.{k}": v for module, params in self.params.items() for k, v in params.items()}

    def count(self) -> int:
        return sum(p.numel() for p in self.named().values())

    def param_groups(self, lr: float, text_encoders: dict[str, TextEncoderConfig]) -> list[dict]:
        """One optimizer group per trained module; a text encoder's own lr wins over the denoiser's. Identifier
        embeddings get a group of their own at their rate, without weight decay: decoupled decay would shrink
        every row of the table, trained or not."""
        groups = []
        for name in self.modules:
            te, table = text_encoders.get(name), self.identifier_embeddings.get(name)
            weights = [p for k, p in self.params[name].items() if k != table]
            if weights:
                groups.append({"params": weights, "lr": (te.lr if te is not None else None) or lr})
            if table is not None:
                groups.append({"params": [self.params[name][table]], "lr": te.resolved_identifier_lr, "weight_decay": 0.0})
        return groups

    def freeze(self, module: str) -> None:
        """Stop training `module` (a text encoder's stop_step, the denoiser before train.denoiser_start_step): no
        grads, so the optimizer skips it - no update, no weight decay, no moment statistics."""
        for p in self.params.get(module, {}).values():
            p.requires_grad_(False)
            p.grad = None

    def unfreeze(self, module: str) -> None:
        """Train `module` again (the denoiser at train.denoiser_start_step)."""
        for p in self.params.get(module, {}).values():
            p.requires_grad_(True)

    def set_frozen(self, modules: set[str]) -> None:
        """Freeze exactly `modules` (`frozen_at`'s answer for a step), touching only those whose state changes."""
        for name in sorted(modules - self.frozen):
            self.freeze(name)
        for name in sorted(self.frozen - modules):
            self.unfreeze(name)
        self.frozen = set(modules)


@dataclass(frozen=True)
class FreezeSchedule:
    """When trained modules sit out: a text encoder from its stop step on, the denoiser before its start step."""

    stop_steps: dict[str, int]  # trained text encoder -> text_encoder*.stop_step
    denoiser: str
    denoiser_start: int = 0  # train.denoiser_start_step: pivotal tuning trains the identifier's embedding first


def frozen_at(step: int, schedule: FreezeSchedule) -> set[str]:
    """The one rule for what is frozen while step `step` + 1 is computed, whether a run starts, resumes or goes on."""
    frozen = {name for name, stop in schedule.stop_steps.items() if step >= stop}
    return frozen | {schedule.denoiser} if step < schedule.denoiser_start else frozen


def trained_module_names(comps: Components, text_encoders: dict[str, TextEncoderConfig]) -> list[str]:
    """The modules that train: the denoiser, then every text encoder whose section trains."""
    return [comps.family.denoiser] + [name for name in comps.family.text_encoders
                                      if name in text_encoders and text_encoders[name].train]


def _lora_config(lora: LoRAConfig, targets: list[str], dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=dora,
                      init_lora_weights="gaussian", target_modules=list(targets))


def encoder_tokenizer(comps: Components, encoder: str):
    """`encoder`'s tokenizer (diffusers names them in pairs: text_encoder/tokenizer, text_encoder_2/tokenizer_2)."""
    return comps.tokenizers[encoder.replace("text_encoder", "tokenizer")]


def identifier_token_ids(comps: Components, encoder: str, identifiers: list[str]) -> list[int]:
    """The token ids the identifiers split into in `encoder`'s tokenizer."""
    tokenizer = encoder_tokenizer(comps, encoder)
    return sorted({i for word in identifiers for i in tokenizer(word, add_special_tokens=False).input_ids})


def _train_rows(embedding: torch.nn.Parameter, rows: list[int]) -> None:
    """Let only `rows` of an embedding table learn: the gradient of every other row is zeroed before the
    optimizer sees it (Adam then leaves those rows exactly as they are)."""
    mask = torch.zeros(embedding.shape[0], 1, dtype=embedding.dtype)
    mask[rows] = 1
    embedding.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))


def setup_trainable(comps: Components, method: str, lora: LoRAConfig, text_encoders: dict[str, TextEncoderConfig],
                    weights_dtype: str = "fp32", identifiers: tuple[str, ...] = ()) -> Trainable:
    """Unfreeze (full) or add adapters to (lora) the denoiser and every text encoder whose section trains.

    Trainable weights are kept in fp32 even under mixed precision: fp16/bf16 cannot represent
    DreamBooth-sized updates (an lr of 1e-6 moves a weight far less than bf16's resolution) when
    they are rounded to nearest. memory.weights_dtype=bf16 stores the trained modules in bf16
    instead, and the optimizer adds each update with stochastic rounding (bf16_adamw.py), which
    keeps those updates in expectation.
    """
    dtype = torch.bfloat16 if weights_dtype == "bf16" else torch.float32
    trained = trained_module_names(comps, text_encoders)
    adapted = []
    for name in trained:
        module = comps.modules[name]
        if dtype != torch.float32:
            module.to(dtype)
        if name in text_encoders and text_encoders[name].scope == "identifier":
            # textual inversion: the rest stays the base's (with LoRA too: an adapter cannot change a token's embedding)
            module.get_input_embeddings().weight.requires_grad_(True)
        elif method == "lora":
            denoiser = name == comps.family.denoiser
            targets = lora.unet_targets if denoiser else lora.text_encoder_targets
            # DoRA on the denoiser only: a text encoder's DoRA magnitudes do not load back through
            # diffusers/transformers (measured: saved as `...lora_magnitude_vector`, expected with `.weight`)
            module.add_adapter(_lora_config(lora, targets or comps.family.lora_targets[name], dora=lora.use_dora and denoiser))
            adapted.append(name)
        else:
            module.requires_grad_(True)
    params = {name: {n: p for n, p in comps.modules[name].named_parameters() if p.requires_grad} for name in trained}
    for group in params.values():
        for p in group.values():
            p.data = p.data.to(dtype)
    tables = {}
    for name, te in text_encoders.items():
        if name in trained and te.resolved_identifier_lr is not None:
            rows = identifier_token_ids(comps, name, list(identifiers))
            if not rows:
                raise DreamBoothError(f"{name}: the identifier(s) {', '.join(identifiers) or '(none)'} give no token in "
                                      f"its tokenizer; set concept.identifier")
            embedding = comps.modules[name].get_input_embeddings().weight
            _train_rows(embedding, rows)
            tables[name] = next(k for k, p in params[name].items() if p is embedding)
    return Trainable(params, tables, adapted, tuple(identifiers) if tables else ())
