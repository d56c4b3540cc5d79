"""DreamBench's prompt templates, and reading your own (no torch here: the command line lists the choices)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DreamBoothError

# DreamBench's prompts (google/dreambooth, dataset/prompts_and_classes.txt at e9b8c01): 20 recontextualisations
# and 5 property changes for objects; 10 recontextualisations, 10 accessorisations and 5 property changes for
# live subjects (dogs, cats). {identifier} is the rare token, {noun} the class noun.
_SHARED = ("in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
           "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
           "with a blue house in the background", "on top of a purple rug in a forest")
_PROPERTIES = ("a red {identifier} {noun}", "a purple {identifier} {noun}", "a shiny {identifier} {noun}",
               "a wet {identifier} {noun}", "a cube shaped {identifier} {noun}")
TEMPLATES = {
    "object": tuple(f"a {{identifier}} {{noun}} {s}" for s in _SHARED + (
        "with a wheat field in the background", "with a tree and autumn leaves in the background",
        "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
        "on top of green grass with sunflowers around it", "on top of a mirror",
        "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug")) + _PROPERTIES,
    "live": tuple(f"a {{identifier}} {{noun}} {s}" for s in _SHARED + (
        "wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf", "wearing a black top hat and a monocle",
        "in a chef outfit", "in a firefighter outfit", "in a police outfit", "wearing pink glasses",
        "wearing a yellow shirt", "in a purple wizard outfit")) + _PROPERTIES,
}


def read_templates(path: str | Path) -> tuple[str, ...]:
    """One template a line (blank lines skipped), with {identifier} and {noun}."""
    path = Path(path)
    if not path.is_file():
        raise DreamBoothError(f"--prompts-file {path}: no such file (one template a line, e.g. "
                              "'a {identifier} {noun} in the snow')")
    templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not templates:
        raise DreamBoothError(f"--prompts-file {path} holds no template; write one a line, e.g. "
                              "'a {identifier} {noun} in the snow'")
    return templates
