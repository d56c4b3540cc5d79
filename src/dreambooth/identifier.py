"""`dreambooth identifier`: pick the rare token that will name your subject, the DreamBooth paper's way.

The paper (Ruiz et al. 2022, section 3.2, "Rare-token Identifiers") warns against identifiers made
of English words or of random letters: a word ("unique", "special") already means something that
the model must first unlearn, and a random string is split by the tokenizer into several common
pieces ("xxy5syt00" -> "xx", "y", "5", ...), each with a meaning of its own. It looks up rare
tokens in the vocabulary instead, decodes them to text, and keeps short ones (up to 3 characters;
for Imagen's T5 it drew them from ids 5,000-10,000). "sks" in Stable Diffusion tutorials is such a
token of CLIP's vocabulary.

This command does the same for any model this package trains, through its tokenizers:

1. candidates: vocabulary entries, rarest first, that decode to 1-3 lowercase letters, are not a
   common short word or abbreviation (`COMMON_WORDS`, `--exclude`), and are one token in *every*
   tokenizer of the model (SDXL has two; DeepFloyd IF uses T5's sentencepiece). Rarity is the
   token id: CLIP's BPE numbers its tokens in merge order (a later merge joins a rarer pair) and
   a sentencepiece unigram vocabulary is stored in order of decreasing score, so a higher id is
   a rarer token in both;
2. what the base model already makes of each: it renders "a photo of TOKEN NOUN" and the plain
   "a photo of a NOUN" with the same seeds, side by side in a grid, and measures the difference.
   In the miniature world the bundled attribute classifier compares the shape, colour and subject
   distributions (total variation distance; 0 = the token changes nothing). Elsewhere, with
   `--clip`, CLIP image embeddings: how much less the token's renders resemble the class renders
   than the class renders resemble each other. A token above `--threshold` is flagged: the model
   already associates it with something, and training would have to overwrite that.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DreamBoothError

# Short English words, names of things and common abbreviations (1-3 letters) that CLIP and T5 know well:
# an identifier made of one would drag its meaning into the subject.
COMMON_WORDS = frozenset("""
a i o u x y
ad ah am an as at ax be by do eh go ha he hi id if in is it me my no of oh ok on or ox pi so to up us we ye yo
ace act add ado age ago aid aim air all and ant any ape app arc are ark arm art ask ate awe axe bad bag ban bar
bat bay bed bee beg bet bib bid big bin bit bob bow box boy bra bud bug bun bus but buy bye cab cam can cap car
cat cow cry cub cup cut dad dam day den dew did die dig dim dip dna doc doe dog don dot dry due dug duo dye ear
eat egg ego elf elk elm emu end era eve eye fab fan far fat fax fed fee few fig fin fir fit fix flu fly foe fog
for fox fry fun fur gal gap gas gel gem get gif gin god got gps gum gun gut guy gym had ham has hat hay hen her
hey hid him hip his hit hog hop hot how hub hue hug hut ice icy ill ink inn ion its ivy jam jar jaw jet job jog
joy jug key kid kin kit lab lad lag lap law lay led leg let lid lie lip lit log lot low mad man map mat may men
met mid mix mob mom mop mow mud mug mum nap net new nil nod nor not now nun nut oak oar oat odd off oil old one
orb ore our out owl own pad pal pan pat paw pay pea pen pet pie pig pin pit pod pop pot pro pub pun pup put rag
ram ran rap rat raw ray red rib rid rig rim rip rob rod rot row rub rug rum run rye sad sag sat saw say sea see
set sew she shy sin sip sir sit six ski sky sly sob son soy spa spy sub sum sun tab tag tan tap tar tax tea ten
the tie tin tip toe ton too top toy try tub tug two ufo urn use van vat vet via vow wag war was wax way web wed
wet who why wig win wit woe wok won wow yak yam yes yet you zip zoo
ai ar ca co de dj dr ep ex fm gb hd hr ii iv la lb lg mc md mr ms mt ny pc pm pr ps rv sf st tv uk ux vs vr xl
abc aka ama amp apr asap atm aug bbc bbq bff bmw cbd ceo cia cnn cpu dec diy dvd eps est etc faq feb fbi fyi
hbo hiv hmm hrs jan jul jun lol mar mba mph mri nasa nba nfl nhl nov oct omg pdf phd png ppl psd rgb rip sat
sep sql sun suv thu tue usa usb vip wed wtf www xxl xxx
""".split())


@dataclass
class IdentifierSettings:
    noun: str  # the class noun, e.g. "dog"
    template: str = "a photo of {token} {noun}"  # the subject prompt, as the instance prompt will read
    class_template: str = "a photo of a {noun}"  # the plain class prompt
    num_candidates: int = 8
    max_length: int = 3  # letters; the paper keeps identifiers of at most 3 characters
    id_range: tuple[int, int] | None = None  # [lo, hi) ids to draw from; None: the rarer half of the vocabulary
    exclude: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()  # also check these (e.g. "sks"), candidates or not
    num_images: int = 4  # renders per prompt; image i of each prompt uses seed + i
    seed: int = 0
    scheduler: str = "dpm++"
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    resolution: int | None = None  # None: the model's own
    threshold: float | None = None  # flag above this association; None: the measure's default

    def __post_init__(self):
        if self.num_images < 2:
            raise DreamBoothError(f"--num-images must be at least 2 (the measures compare sets of renders), got "
                                  f"{self.num_images}")
        try:
            self.template.format(token="sks", noun=self.noun)
            self.class_template.format(noun=self.noun)
        except (KeyError, IndexError) as e:
            raise DreamBoothError(f"a prompt template names an unknown field {e}: --prompt may use {{token}} and "
                                  "{noun}, --class-prompt {noun}") from None


@dataclass
class Candidate:
    token: str
    rank: float  # its id / vocabulary size in the first tokenizer (1.0 = the rarest end); -1 if not one token there
    ids: dict[str, list[int]]  # tokenizer name -> the token ids the word becomes (one id: a single token)
    association: float | None = None  # how different its renders are from the class prompt's; None: not measured
    details: dict = field(default_factory=dict)
    flagged: bool = False

    @property
    def single(self) -> bool:
        return all(len(ids) == 1 for ids in self.ids.values())


def tokenizers_of(model_dir: Path, family) -> dict:
    """The model's tokenizers by part name (tokenizer, tokenizer_2), without loading any weights."""
    from transformers import AutoTokenizer

    return {part: AutoTokenizer.from_pretrained(model_dir / part) for part in family.parts if part.startswith("tokenizer")}


def token_ids(tokenizers: dict, word: str) -> dict[str, list[int]]:
    """The ids `word` becomes in each tokenizer, without the start/end tokens."""
    return {name: tok(word, add_special_tokens=False).input_ids for name, tok in tokenizers.items()}


def rare_candidates(tokenizers: dict, settings: IdentifierSettings) -> list[Candidate]:
    """Rarest first: vocabulary entries that decode to 1..max_length lowercase letters, are no common word, and are
    one token in every tokenizer (the first tokenizer's vocabulary is searched; ids in settings.id_range)."""
    primary = next(iter(tokenizers.values()))
    size = len(primary)
    lo, hi = settings.id_range or (size // 2, size)
    if not 0 <= lo < hi <= size:
        raise DreamBoothError(f"--id-range {lo} {hi} is outside the vocabulary (0 .. {size}); give LO < HI <= {size}")
    skip = set(primary.all_special_ids)
    pattern = re.compile(f"[a-z]{{1,{settings.max_length}}}")
    excluded = COMMON_WORDS | {w.lower() for w in settings.exclude}
    found: list[Candidate] = []
    for i in range(hi - 1, lo - 1, -1):
        if i in skip:
            continue
        word = primary.decode([i]).strip()
        if not pattern.fullmatch(word) or word in excluded:
            continue
        ids = token_ids(tokenizers, word)
        # The word must come back as this very id (a word-internal BPE piece such as "puc" decodes to the same
        # letters but a lone "puc" is tokenized differently), and as one token in every other tokenizer.
        if next(iter(ids.values())) == [i] and all(len(v) == 1 for v in ids.values()):
            found.append(Candidate(word, i / size, ids))
            if len(found) == settings.num_candidates:
                break
    return found


def checked_tokens(tokenizers: dict, words: tuple[str, ...]) -> list[Candidate]:
    """Candidates for words the user names (`--token sks`), whatever they tokenize to."""
    primary = next(iter(tokenizers.values()))
    out = []
    for word in words:
        ids = token_ids(tokenizers, word)
        first = next(iter(ids.values()))
        out.append(Candidate(word, first[0] / len(primary) if len(first) == 1 else -1.0, ids))
    return out


class ClassifierMeasure:
    """The miniature world's attribute classifier: total variation distance between the label distributions of
    the token's renders and the class prompt's, per head (shape, colour, subject); the association is the largest."""

    name = "classifier"
    default_threshold = 0.25  # 4 renders per prompt: one label in four moved; the renders decide

    def __init__(self, folder):
        from .miniworld.classifier import load_classifier

        self.classifier = load_classifier(folder)

    def labels(self, images: list) -> dict[str, list[str]]:
        from .miniworld import world

        batch = np.stack([world.to_array(im.convert("RGB").resize((world.SIZE, world.SIZE))) for im in images])
        return self.classifier.predict(torch.from_numpy(batch))  # (N, 3, 32, 32) in [-1, 1]

    def compare(self, token_images: list, class_images: list) -> tuple[float, dict]:
        a, b = self.labels(token_images), self.labels(class_images)
        tv = {head: _total_variation(a[head], b[head]) for head in ("shape", "colour", "subject")}
        return max(tv.values()), {"total_variation": tv, "token_labels": {h: a[h] for h in tv},
                                  "class_labels": {h: b[h] for h in tv}}


class ClipMeasure:
    """CLIP image embeddings: (mean similarity among the class renders) - (mean similarity of the token's renders
    to the class renders). About 0 when the token leaves the class as it is; positive when it pulls away."""

    name = "clip"
    default_threshold = 0.05  # cosine similarity; a starting point to read beside the grids, not a calibrated cut

    def __init__(self, folder, device: str = "cpu"):
        from .evaluation.embedders import ClipEmbedder

        self.clip = ClipEmbedder(folder, device)

    def compare(self, token_images: list, class_images: list) -> tuple[float, dict]:
        from .evaluation.real import mean_cosine

        t, c = self.clip.embed(token_images), self.clip.embed(class_images)
        within, across = mean_cosine(c), mean_cosine(t, c)
        return within - across, {"class_vs_class": within, "token_vs_class": across}


def _total_variation(a: list[str], b: list[str]) -> float:
    """0.5 * sum over labels of |p_a - p_b| (0: the same distribution, 1: disjoint)."""
    labels = set(a) | set(b)
    return 0.5 * sum(abs(a.count(x) / len(a) - b.count(x) / len(b)) for x in labels)


def pick_identifier(model_dir: str | Path, settings: IdentifierSettings, out_dir: str | Path, measure=None,
                    render: bool = True, device: str = "cpu") -> dict:
    """List rare single-token identifiers for the model in `model_dir`, render and measure each (see the module
    docstring), and write `identifier.json` and `grid.png` (row 1: the class prompt; then one row per token) to
    `out_dir`, with one `tokens/<token>.png` per token (its renders over the class prompt's, same seeds).

    Returns:
        dict: {"model", "tokenizers": {name: vocabulary size}, "settings", "measure", "candidates": [...]}, the
        candidates ranked: measured ones by association (lowest first), the flagged ones last.
    """
    from .config import ModelConfig
    from .interop.single_file import model_folder
    from .models.load import detect_family
    from .sampling import generate, image_grid, make_scheduler

    t0 = time.time()
    s = settings
    model_dir = model_folder(ModelConfig(path=str(model_dir)))  # a single-file checkpoint: its converted folder
    family = detect_family(model_dir)
    if not family.trains_with_identifier:
        raise DreamBoothError(f"{model_dir} ({family.name}) trains without an identifier (its prompts drop it); "
                              "pick the identifier with the first stage's model instead")
    # Rendering needs every part; listing needs the tokenizers only (SDXL's or IF's weights are many GB).
    comps = family.load(model_dir) if render else None
    tokenizers = comps.tokenizers if comps else tokenizers_of(model_dir, family)
    candidates = rare_candidates(tokenizers, s)
    known = {c.token for c in candidates}
    candidates = checked_tokens(tokenizers, tuple(t for t in s.tokens if t not in known)) + candidates
    if not candidates:
        raise DreamBoothError(f"no token of {s.max_length} letters or fewer in ids {s.id_range or 'the rarer half'} of "
                              f"{model_dir}'s vocabulary is a single token in every tokenizer; widen --id-range or "
                              "--max-length")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threshold = None
    if render:
        (out_dir / "tokens").mkdir(exist_ok=True)
        pipe = comps.family.pipeline(comps, make_scheduler(s.scheduler, comps.inference_scheduler.config)).to(device)
        seeds = [s.seed + i for i in range(s.num_images)]

        def draw(prompt: str) -> list:
            size = {"height": s.resolution, "width": s.resolution} if s.resolution else {}
            return generate(pipe, [prompt] * s.num_images, seeds, num_inference_steps=s.num_inference_steps,
                            guidance_scale=s.guidance_scale, batch_size=s.num_images, **size)

        class_images = draw(s.class_template.format(noun=s.noun))
        rows = [class_images]
        threshold = s.threshold if s.threshold is not None else getattr(measure, "default_threshold", None)
        for c in candidates:
            images = draw(s.template.format(token=c.token, noun=s.noun))
            rows.append(images)
            name = re.sub(r"[^A-Za-z0-9_-]", "_", c.token)  # a --token may hold any character
            image_grid(images + class_images, cols=s.num_images).save(out_dir / "tokens" / f"{name}.png")
            if measure is not None:
                c.association, c.details = measure.compare(images, class_images)
                c.flagged = c.association > threshold
        image_grid([im for row in rows for im in row], cols=s.num_images).save(out_dir / "grid.png")
    # Best first: single tokens before split ones, then unflagged before flagged, then the weakest association.
    candidates.sort(key=lambda c: (not c.single, c.flagged, c.association if c.association is not None else 0.0))
    result = {"model": str(model_dir), "tokenizers": {n: len(t) for n, t in tokenizers.items()},
              "settings": asdict(s), "measure": getattr(measure, "name", None), "threshold": threshold,
              "candidates": [{**asdict(c), "single": c.single} for c in candidates], "seconds": round(time.time() - t0, 1)}
    (out_dir / "identifier.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict) -> str:
    """One line per candidate: token, rank, single-token in each tokenizer, association and flag."""
    names = list(result["tokenizers"])
    lines = [f"{result['model']}: tokenizers " + ", ".join(f"{n} ({v} tokens)" for n, v in result["tokenizers"].items())
             + (f"; measure: {result['measure']} (flag above {result['threshold']})" if result["measure"] else ""),
             f"{'token':<8}{'id':>7}{'rarity':>8}  " + "".join(f"{n:>14}" for n in names) + f"{'association':>13}  note",
             "-" * (39 + 14 * len(names))]
    for c in result["candidates"]:
        cells = "".join(f"{('1 token' if len(c['ids'][n]) == 1 else str(len(c['ids'][n])) + ' tokens'):>14}" for n in names)
        assoc = f"{c['association']:.3f}" if c["association"] is not None else "-"
        note = "not one token" if not c["single"] else "ALREADY MEANS SOMETHING" if c["flagged"] else ""
        first = c["ids"][names[0]]
        token_id, rarity = (str(first[0]), f"{c['rank']:.4f}") if len(first) == 1 else ("-", "-")
        lines.append(f"{c['token']:<8}{token_id:>7}{rarity:>8}  {cells}{assoc:>13}  {note}")
    return "\n".join(lines)
