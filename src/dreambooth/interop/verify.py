"""Check an export by loading it back through an independent path and running the networks.

A probe runs one module on fixed-seed inputs that its family shapes from the module's config
(`ModelFamily.probe_inputs`: a UNet gets a latent, a timestep, text states and, where its family
needs them, SDXL's size/pool embedding or IF's class labels; a text encoder gets token ids and
returns every hidden state; a VAE decodes a latent). `compare` runs the same probe on two modules
and reports the largest difference per output, so a wrong config (an attention head count, a
linear vs conv projection) fails even when every tensor loaded.

`renders` is the last check of every export and conversion: the family's pipeline class loads the
written model as a user loads it (`user_pipeline`: `from_pretrained` or `from_single_file`, offline)
and renders one image at the smallest size in two steps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

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


def _moved(value, device, dtype):
    """Probe inputs onto the module's device; floating tensors in its dtype (token ids and timesteps keep theirs)."""
    if isinstance(value, dict):
        return {k: _moved(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


@torch.no_grad()
def _run(fam, part: str, module, seed: int) -> list[torch.Tensor]:
    first = next(module.parameters())
    kwargs = _moved(fam.probe_inputs(part, module.config, torch.Generator().manual_seed(seed)), first.device, first.dtype)
    training, wrapper = module.training, module.__dict__.get("forward")
    module.eval()  # no dropout (a LoRA's included): the probe must be deterministic
    if "_original_forward" in module.__dict__:  # accelerate's mixed-precision wrapper: probe the network itself
        module.forward = module._original_forward
    try:
        if part != fam.denoiser and part not in fam.text_encoders:  # a VAE: decode
            return [module.decode(**kwargs).sample.float().cpu()]
        out = module(**kwargs)
    finally:
        module.train(training)
        if wrapper is not None:
            module.forward = wrapper
    if part == fam.denoiser:
        return [out.sample.float().cpu()]
    tensors = list(out.hidden_states) + [out.last_hidden_state]
    extra = getattr(out, "text_embeds", None)  # SDXL's projected pool
    return [t.float().cpu() for t in tensors + ([extra] if extra is not None else [])]


def compare(report: Verification, what: str, fam, part: str, reference, candidate, relative: float = 0.0,
            file: str = "", seed: int = 0) -> None:
    """Run both copies of the family's module `part` on the same inputs (`ModelFamily.probe_inputs`); record
    the largest difference over every output. It may be at most `relative` x the reference's largest output."""
    a, b = _run(fam, part, reference, seed), _run(fam, part, candidate, seed)
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


RENDER_STEPS = 2  # the fewest every shipped sampler takes (PNDM's first step is a warm-up)


def user_pipeline(fam, folder: Path, single_file: Path | None = None, **parts):
    """The family's pipeline class loading `folder` as a user does, offline: `from_pretrained(folder)`, or with
    `single_file`, `from_single_file(single_file, config=folder)`. Optional parts the family does not train
    (a safety checker, its feature extractor) that the folder holds are passed as None: a render does not
    need them, and loading a safety checker costs a second CLIP. One that model_index.json names but the
    folder lacks is left to diffusers, which fails on it as it would for the user. `parts` replace others."""
    import json

    import diffusers

    cls = getattr(diffusers, fam.pipeline_class_names[0])
    accepted = inspect.signature(cls.__init__).parameters
    index = json.loads((Path(folder) / "model_index.json").read_text())
    held = {name for name, entry in index.items() if not isinstance(entry, list) or entry[0] is None
            or (Path(folder) / name).is_dir()}
    kwargs = {name: None for name in getattr(cls, "_optional_components", [])
              if name not in fam.parts and name in accepted and name in held}
    if "requires_safety_checker" in accepted:
        kwargs["requires_safety_checker"] = False
    kwargs.update(parts, local_files_only=True)
    if single_file is not None:
        return cls.from_single_file(str(single_file), config=str(folder), **kwargs)
    return cls.from_pretrained(folder, **kwargs)


def renders(report: Verification, what: str, fam, load, file: str = "") -> None:
    """`load()` -> a pipeline (`user_pipeline`); it must render one image, finite and of the asked size, from
    the family's cheapest call (`ModelFamily.render_inputs`)."""
    try:
        pipe = load()
        inputs = fam.render_inputs(pipe)
        images = pipe(**inputs, num_inference_steps=RENDER_STEPS, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    except Exception as e:  # noqa: BLE001 - any failure to load or render is the finding
        report.fail(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file)
        return
    images = torch.as_tensor(images)
    shape = (1, inputs["height"], inputs["width"], 3)
    if tuple(images.shape) != shape or not torch.isfinite(images).all():
        report.fail(f"{what}: rendered {tuple(images.shape)} (want {shape}), finite: {bool(torch.isfinite(images).all())}", file)
    else:
        report.checks.append(f"{what}: rendered a {shape[1]}x{shape[2]} image in {RENDER_STEPS} steps")
