"""Single-file checkpoints (one `.safetensors`/`.ckpt`, as AUTOMATIC1111 and ComfyUI keep them) in and out.

In: `read_checkpoint` opens the file safely, `checkpoint_family` recognises it by its key prefixes
(each family's `single_file` table), and `to_diffusers` rebuilds a diffusers folder through
diffusers' own single-file converters (`from_single_file`), given a folder of configs - the ones
shipped in `assets/single_file/` for the public base models, or the user's. Nothing is fetched:
diffusers would otherwise download those configs from the Hub. `cached_folder` does it once per
file, keyed by the file's sha256.

Out: `write_single_file` lays the modules out with `layout.to_original`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import DreamBoothError
from ..files import atomic_file
from ..models.load import FAMILIES, detect_family

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "single_file"
CLIP_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "clip_vocab"  # the full 49,408-token CLIP BPE
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# safetensors metadata written with our files (the ModelSpec keys A1111/ComfyUI tools read); a file
# without it is recognised from its keys alone.
PREDICTION_KEY = "modelspec.prediction_type"


class TrackedDict(dict):
    """A state dict that remembers which keys were read, so a converter's leftovers can be listed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def is_single_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() in SUFFIXES


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and its safetensors metadata. A pickle is opened with `weights_only=True`;
    one that needs more (arbitrary code) is refused unless `allow_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise DreamBoothError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise DreamBoothError(f"{path} is not a readable .safetensors file ({e}); re-download or re-export it") from None
    if suffix not in PICKLE_SUFFIXES:
        raise DreamBoothError(f"{path}: unknown checkpoint type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the safe unpickler
        if not allow_pickle:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DreamBoothError(
                f"{path} is a pickle checkpoint that the safe loader (torch.load weights_only=True) refused: {first}. "
                "Loading it fully would run whatever code it contains on this machine; use a .safetensors copy, or "
                "pass --allow-pickle only if you trust where the file came from") from None
        state = torch.load(path, map_location="cpu", weights_only=False)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DreamBoothError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def checkpoint_family(state: dict, path: str | Path):
    """The family whose single-file prefixes all appear in the checkpoint's keys (`models.load.detect_family`
    is the same question asked of a diffusers folder's model_index.json)."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    for fam in FAMILIES.values():
        if fam.single_file and all(has(p) for p in fam.single_file.values()):
            return fam
    if has("model.diffusion_model.") and has("conditioner.embedders.0.model."):
        raise DreamBoothError(f"{path} is an SDXL refiner (one OpenCLIP encoder); DreamBooth trains the SDXL base")
    known = "; ".join(f"{fam.name}: {', '.join(fam.single_file.values())}" for fam in FAMILIES.values() if fam.single_file)
    raise DreamBoothError(f"{path} is not an SD 1.x/2.x or SDXL single-file checkpoint (expected key prefixes {known}). "
                          "DeepFloyd IF has no single-file layout; use its diffusers folder")


def sha256(path: Path) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                                     disable=path.stat().st_size < 1 << 28) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def cache_root() -> Path:
    """$DREAMBOOTH_CACHE, else $XDG_CACHE_HOME/dreambooth, else ~/.cache/dreambooth."""
    if os.environ.get("DREAMBOOTH_CACHE"):
        return Path(os.environ["DREAMBOOTH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dreambooth"


def shipped_config(fam, state: dict, metadata: dict[str, str], path: Path) -> Path:
    """The shipped config folder of the family's public base model this file is (`ModelFamily.single_file_configs`,
    in order): those whose text encoders are the file's kind (OpenCLIP or OpenAI CLIP keys; SD 2.x against 1.x),
    then, where several remain (SD 2.x's 512 base and 768-v), the one of the file's prediction type."""
    fits = [SHIPPED / name for name in fam.single_file_configs if _same_text_encoders(fam, state, SHIPPED / name)]
    if not fits:
        raise DreamBoothError(f"{path}'s text encoder keys match none of the shipped {fam.name} configs "
                              f"({', '.join(fam.single_file_configs)}); pass its architecture with --config / "
                              "model.single_file_config (a diffusers folder of this model)")
    if len(fits) > 1:
        prediction = metadata.get(PREDICTION_KEY) or ("v" if _answers_in_v(state, fits[0]) else "epsilon")
        fits = [c for c in fits if _prediction_type(c).startswith(prediction[0])] or fits  # v / v_prediction, epsilon
    return fits[0]


def _same_text_encoders(fam, state: dict, config_dir: Path) -> bool:
    """Whether each text encoder of the config is of the kind the file holds under its prefix: OpenCLIP
    (GELU; keys `<prefix>model.`) or OpenAI CLIP (QuickGELU; keys `<prefix>transformer.`)."""
    from .layout import OPEN_CLIP_ACTIVATION

    for part in fam.text_encoders:
        config = json.loads((config_dir / part / "config.json").read_text())
        open_clip = any(k.startswith(fam.single_file[part] + "model.") for k in state)
        if open_clip != (config.get("hidden_act") == OPEN_CLIP_ACTIVATION):
            return False
    return True


def _prediction_type(config_dir: Path) -> str:
    return json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type", "epsilon")


def _answers_in_v(state: dict, config_dir: Path) -> bool:
    """SD 2.x files do not say whether they predict noise (512 base) or v (768-v). Ask the UNet, as
    AUTOMATIC1111 does: at t=999 on a constant input an epsilon model returns about its input, a
    v model about its negative, so the mean of (output - input) falls well below -1 only for v."""
    unet = load_part_from(state, config_dir, "unet", "UNet2DConditionModel")
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), encoder_hidden_states=torch.full((1, 2, unet.config.cross_attention_dim), 0.5)).sample
    return (out - x).mean().item() < -1


def load_part_from(state: dict, config_dir: Path, part: str, class_name: str, dtype=None):
    """One module from an original-layout state dict through diffusers' single-file converters, its
    config read from `config_dir/part` (never the Hub)."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    try:
        if hasattr(diffusers, class_name):
            model = getattr(diffusers, class_name).from_single_file(state, config=str(config_dir), subfolder=part,
                                                                    local_files_only=True)
        else:
            model = create_diffusers_clip_model_from_ldm(getattr(transformers, class_name), state, subfolder=part,
                                                         config=str(config_dir), local_files_only=True)
    except (ValueError, RuntimeError, KeyError) as e:  # shapes or names that do not fit the config
        # diffusers: "... because K expected shape torch.Size([1280, 320]), but got torch.Size([128, 32]). ..."
        shapes = re.search(r"(\S+) expected shape (?:torch\.Size\()?(\[[^\]]*\])\)?, but got (?:torch\.Size\()?(\[[^\]]*\])",
                           str(e))
        why = (f"{shapes[1]} is {shapes[3]} in the file, the config wants {shapes[2]}" if shapes
               else str(e).splitlines()[0][:200])
        raise DreamBoothError(f"the checkpoint's {part} does not fit the architecture in {config_dir} "
                              f"({why}); pass the matching config (--config / "
                              "model.single_file_config: a shipped name or a diffusers folder of this model)") from None
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise DreamBoothError(f"the checkpoint has no weights for {len(missing)} {part} parameter(s) of {config_dir.name}'s "
                              f"architecture (e.g. {missing[0]}); is it the right config for this file?")
    return owned(model, dtype)


def owned(model, dtype=None):
    """The module with every tensor copied into memory of its own, cast to `dtype` if given.

    Weights read from a file keep pointing into its buffer; CPU kernels then pick code paths by
    address alignment, and the same weights give outputs a few 1e-7 apart - enough to hide whether
    two loads are bitwise equal. (Casting here, not with .to(): diffusers' .to() warns about fp32 modules.)
    """
    return model._apply(lambda t: t.to(dtype, copy=True) if dtype is not None and t.is_floating_point() else t.clone())


def load_modules(state: dict, fam, config_dir: Path, dtype=None) -> tuple[dict, list[str]]:
    """Every part of the family's single-file layout, and the file's keys no converter read."""
    index = json.loads((config_dir / "model_index.json").read_text())
    tracked = TrackedDict(state)
    modules = {part: load_part_from(tracked, config_dir, part, index[part][1], dtype) for part in fam.single_file}
    return modules, sorted(set(state) - tracked.read)


def tokenizers_from(config_dir: Path) -> dict:
    """The tokenizers a config folder names: its own files, or the shipped full CLIP vocabulary plus
    its tokenizer_config.json (the shipped folders keep one copy of the 1.5 MB vocabulary)."""
    import tempfile

    from transformers import CLIPTokenizer

    out = {}
    for folder in sorted(config_dir.glob("tokenizer*")):
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            out[folder.name] = CLIPTokenizer.from_pretrained(folder)
            continue
        with tempfile.TemporaryDirectory() as tmp:  # from_pretrained wants the three files in one folder
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(CLIP_VOCAB / name, Path(tmp) / name)
            shutil.copy(folder / "tokenizer_config.json", Path(tmp) / "tokenizer_config.json")
            out[folder.name] = CLIPTokenizer.from_pretrained(tmp)
    return out


def to_diffusers(path: str | Path, out: str | Path, config: str | Path | None = None,
                 allow_pickle: bool = False) -> Path:
    """Convert a single-file checkpoint into a diffusers folder at `out` (written whole, then renamed)."""
    path, out = Path(path), Path(out)
    state, metadata = read_checkpoint(path, allow_pickle)
    fam = checkpoint_family(state, path)
    config_dir = resolve_config(config) if config else shipped_config(fam, state, metadata, path)
    modules, unread = load_modules(state, fam, config_dir)
    if unread:
        print(f"note: {len(unread)} tensor(s) in {path.name} belong to no part diffusers uses (e.g. {unread[0]}); "
              "left out")
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # one per process: several may convert at once
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(config_dir / "scheduler", tmp / "scheduler")
    tokenizers = tokenizers_from(config_dir)
    for name, tok in tokenizers.items():
        tok.save_pretrained(tmp / name)
    index = written_index(json.loads((config_dir / "model_index.json").read_text()), {*modules, *tokenizers, "scheduler"})
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, module in modules.items():
        module.save_pretrained(tmp / name, safe_serialization=True)
    (tmp / "single_file_source.json").write_text(json.dumps({"file": str(path.resolve()), "config": config_dir.name}))
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first; its folder is the same conversion
        if not (out / "model_index.json").is_file():
            raise
        shutil.rmtree(tmp)
    return out


def written_index(index: dict, written: set[str]) -> dict:
    """The config folder's model_index.json for a folder that holds only the `written` parts: every other
    part it names (a real SD 1.5 folder's feature_extractor and safety_checker, which no single file
    holds) becomes [null, null], diffusers' mark of an absent optional part, so `from_pretrained` loads
    the folder instead of looking for a sub-folder that is not there; and no safety checker is asked for."""
    out = {key: [None, None] if isinstance(value, list) and len(value) == 2 and key not in written else value
           for key, value in index.items()}
    if "requires_safety_checker" in out:
        out["requires_safety_checker"] = False
    return out


def resolve_config(config: str | Path) -> Path:
    """A config folder: a shipped name (sd15, sd2-512, sd2-768-v, sdxl-base) or a diffusers folder."""
    if (SHIPPED / str(config)).is_dir():
        return SHIPPED / str(config)
    folder = Path(config)
    if not (folder / "model_index.json").is_file():
        shipped = ", ".join(sorted(p.name for p in SHIPPED.iterdir() if p.is_dir()))
        raise DreamBoothError(f"single-file config {config} is neither a shipped one ({shipped}) nor a diffusers folder "
                              "with model_index.json")
    return folder


def cached_folder(path: str | Path, config: str | Path | None = None, allow_pickle: bool = False) -> Path:
    """The diffusers folder for a single file, converted once and kept under cache_root() by the file's hash."""
    path = Path(path)
    key = sha256(path)[:20]
    if config:  # the same file read with another architecture is another conversion
        folder = resolve_config(config).resolve()
        key += f"-{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
    out = cache_root() / "single-file" / key
    if not (out / "model_index.json").is_file():
        print(f"converting {path} to a diffusers folder (once; cached at {out})")
        to_diffusers(path, out, config, allow_pickle)
    return out


def model_folder(model) -> Path:
    """The diffusers folder for ModelConfig `model`: its path, or for a single-file checkpoint the
    folder converted from it (once; cached by the file's hash). The loader (`models.load`) reads
    only diffusers folders; turning a file into one is this module's job."""
    if is_single_file(model.path):
        return cached_folder(model.path, model.single_file_config, model.allow_pickle)
    return Path(model.path)


def original_state_dict(modules, fam, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The modules' weights in the family's single-file layout (`layout.to_original`). `modules` maps
    part -> module, or is a function part -> module, so parts can be loaded one at a time."""
    from .layout import to_original

    get = modules if callable(modules) else modules.__getitem__
    state: dict[str, torch.Tensor] = {}
    for part, prefix in fam.single_file.items():
        for key, value in to_original(prefix, get(part), fam.single_file_tables[part]).items():
            state[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return state


def saved_part(folder: Path, part: str, dtype=None):
    """One part of a diffusers folder, loaded by the class model_index.json names."""
    import diffusers
    import transformers

    library, class_name = json.loads((folder / "model_index.json").read_text())[part]
    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    return owned(cls.from_pretrained(folder / part), dtype)


def folder_to_single_file(folder: str | Path, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A diffusers folder (a base model or a full fine-tune's output) -> one original-layout file."""
    folder = Path(folder)
    fam = detect_family(folder)
    if not fam.single_file:
        raise DreamBoothError(f"{folder} is a {fam.name} model; that family has no single-file layout")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return write_single_file(lambda part: saved_part(folder, part), fam, path, dtype,
                             scheduler.get("prediction_type", "epsilon"))


def write_single_file(modules, fam, path: str | Path, dtype: torch.dtype | None = None,
                      prediction_type: str = "epsilon") -> Path:
    """Write the modules as one original-layout .safetensors file (atomically: beside it, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = original_state_dict(modules, fam, dtype)
    metadata = {PREDICTION_KEY: "v" if prediction_type == "v_prediction" else "epsilon",
                "modelspec.sai_model_spec": "1.0.0", "format": "pt"}
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path
