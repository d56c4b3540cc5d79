"""Finding a model folder's family: refusals that name what exists, the family's resolution step, and no
import cycle between the loader and the formats it does not read (single files live in interop)."""

import ast
import json
from pathlib import Path

import pytest

from dreambooth.errors import DreamBoothError
from dreambooth.models.load import FAMILIES, check_resolution, detect_family

SRC = Path(__file__).resolve().parents[1] / "src" / "dreambooth"


@pytest.mark.parametrize("pipeline", ["FluxPipeline", "StableDiffusion3Pipeline"])
def test_an_unsupported_pipeline_is_refused_naming_the_families(tmp_path, pipeline):
    """No model.family value fits a FLUX.1 or SD3 folder: the message lists the families there are and says
    this pipeline is none of them, without sending the user to a setting that cannot help."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "transformer": ["diffusers", "X"]}))
    with pytest.raises(DreamBoothError) as e:
        detect_family(tmp_path)
    message = str(e.value)
    assert f"holds a {pipeline} pipeline, which no family of this version trains" in message
    for name, fam in FAMILIES.items():  # every family, with its pipelines, as they are registered
        assert f"{name} ({', '.join(fam.pipeline_class_names)})" in message
    assert "model.family" not in message


def test_a_folder_naming_no_pipeline_is_sent_to_model_family(tmp_path):
    """There the setting can help: the folder may be one of the families, and only the user knows which."""
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(DreamBoothError, match=r"names no pipeline \(_class_name\); set model.family to the one it is: "
                                              r"sd \(StableDiffusionPipeline\)"):
        detect_family(tmp_path)


def test_check_resolution_uses_the_familys_resolution_step(tiny_sd_dir):
    """The step is the family's (latent factor x patch size), not the bare latent factor: a family whose
    denoiser packs 2x2 latents (a FLUX-like transformer) doubles it."""
    fam = FAMILIES["sd"]
    assert fam.resolution_step(tiny_sd_dir) == fam.latent_factor(tiny_sd_dir) == 2  # a UNet: patch size 1
    check_resolution(34, tiny_sd_dir, fam)

    class Patched(type(fam)):
        def resolution_step(self, model_dir):
            return 2 * self.latent_factor(model_dir)

    with pytest.raises(DreamBoothError, match=r"data.resolution must be a multiple of 4 .* got 34; try 32"):
        check_resolution(34, tiny_sd_dir, Patched())


def _imports(path: Path) -> set[str]:
    """Every dreambooth module `path` imports, at the top or inside a function, as absolute names."""
    package = ["dreambooth", *path.relative_to(SRC).with_suffix("").parts[:-1]]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dreambooth"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dreambooth"))
    return out


def test_the_models_package_imports_nothing_from_interop():
    """interop reads families (models); no module of models reaches back, not even inside a function, so
    the single-file <-> loader cycle cannot come back."""
    offenders = {p.name: sorted(m for m in _imports(p) if m.startswith("dreambooth.interop"))
                 for p in sorted((SRC / "models").glob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    assert "dreambooth.models.load" in _imports(SRC / "interop" / "single_file.py")  # the one direction, kept


def test_the_two_family_detectors_have_distinct_names():
    from dreambooth.interop import single_file

    assert not hasattr(single_file, "detect_family") or single_file.detect_family is detect_family
    assert callable(single_file.checkpoint_family) and callable(single_file.model_folder)
