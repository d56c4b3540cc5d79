"""Build a tiny T5-style (SentencePiece-unigram) tokenizer from built-in caption text, for the tiny DeepFloyd IF models.

IF encodes prompts with T5-v1.1-XXL's tokenizer (32,000 unigram pieces + 100 `<extra_id_N>` sentinels; <pad> 0,
</s> 1, <unk> 2; every word starts with the "▁" metaspace). That vocabulary is a download, so the tests use this
small one instead: a unigram vocabulary whose pieces are the words of a few hundred lines of caption-like English
generated below (scored by their log frequency, as a unigram model's are) plus single characters, handed to
transformers' `T5Tokenizer` (in transformers 5 the `tokenizers`-backed class; `T5TokenizerFast` is the same class)
and written with `save_pretrained` as tokenizer.json + tokenizer_config.json. No sentencepiece, no trainer, no
randomness: the output depends only on this file and the installed transformers/tokenizers.
(`tokenizers`' UnigramTrainer was tried first; on a corpus this small it keeps only ~250 mostly one-letter pieces,
so even "photo" came out as five tokens, and its order of equal-score characters changed from run to run.)

    python scripts/make_t5_tokenizer.py src/dreambooth/assets/t5_tokenizer
    python scripts/make_t5_tokenizer.py --miniworld /tmp/t5_miniworld   # + every word of the miniature world

`--miniworld` adds the miniature world's caption grammar (every shape, colour and background word, and
the prompts the evaluation uses) to the corpus, so that the miniature IF base reads each world word as
one piece, as a real T5 vocabulary would.
"""

import argparse
import math
import string
from collections import Counter
from pathlib import Path

SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2, in this order
SUBJECTS = ["dog", "cat", "puppy", "kitten", "person", "man", "woman", "child", "teddy bear", "backpack", "vase",
            "sneaker", "toy", "robot", "car", "clock", "cup", "bowl", "candle", "boot", "sunglasses", "monster"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "golden",
           "silver", "dark", "light", "bright", "colorful"]
SHAPES = ["square", "circle", "triangle", "stripe", "dot", "cube", "sphere", "round", "small", "large", "tiny",
          "big", "fluffy", "shiny", "wooden", "metal", "plastic", "soft"]
PLACES = ["on the beach", "in the snow", "in a garden", "on a table", "in the city", "on the grass", "in a forest",
          "on a sofa", "in front of a wall", "under a tree", "on a wooden floor", "in the kitchen", "at night",
          "in the desert", "on a mountain", "by the river", "with a blue sky", "on a white background",
          "with a gradient background", "in a studio", "next to a window", "on the street", "in the rain"]
STYLES = ["a photo of", "a close up photo of", "a high quality photo of", "a painting of", "a drawing of",
          "a picture of", "a cropped photo of", "a rendering of", "an illustration of", "a blurry photo of",
          "a bright photo of", "a dark photo of", "a good photo of", "a cute"]
EXTRA = ("sks the a an and of with in on at by to for is it this that one two three four five very high detailed "
         "realistic portrait style art oil watercolor sketch cartoon pixel film camera lens bokeh sharp focus "
         "lighting sunset morning evening shadow reflection background foreground texture pattern gradient "
         "wearing sitting standing running sleeping looking holding playing floating jumping")


def world_corpus() -> list[str]:
    """Every caption the miniature world writes: each shape x colour x background, with parts left out."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from dreambooth.miniworld import world

    shapes, colours = (None, *world.SHAPES), (None, *world.COLOURS)
    return [world.describe(sh, co, bg) for sh in shapes for co in colours for bg in (None, *world.BACKGROUNDS)]


def corpus(miniworld: bool = False) -> list[str]:
    """Caption-like lines; "sks" (the DreamBooth identifier) appears often, so it ends up a single piece."""
    lines = world_corpus() if miniworld else []
    for i, subject in enumerate(SUBJECTS):
        for j, style in enumerate(STYLES):
            colour = COLOURS[(i + j) % len(COLOURS)]
            shape = SHAPES[(i * 3 + j) % len(SHAPES)]
            place = PLACES[(i * 5 + j) % len(PLACES)]
            lines.append(f"{style} sks {subject} {place}")
            lines.append(f"{style} a {colour} {shape} {subject} {place}")
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            lines.append(f"a {colour} {shape} on a {COLOURS[(i + j + 1) % len(COLOURS)]} background")
    lines += [EXTRA] * 3
    return lines


def build_vocab(miniworld: bool = False) -> list[tuple[str, float]]:
    """(piece, score) pairs in T5's layout: <pad>, </s>, <unk>, then pieces by falling score.

    A unigram model scores a split by the sum of its pieces' log-probabilities, so giving every corpus word a
    "▁word" piece scored log(count / total) and every single character (and the bare "▁") a lower score makes
    known words one piece each and spells anything else out character by character, never as <unk> for ASCII.
    """
    counts = Counter(word for line in corpus(miniworld) for word in line.split())
    total = sum(counts.values())
    pieces = {f"▁{word}": math.log(n / total) for word, n in counts.items()}
    floor = math.log(1 / total) - 2.0  # below every word piece
    pieces.setdefault("▁", floor)
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault(ch, floor - 1.0)
    ranked = sorted(pieces.items(), key=lambda kv: (-round(kv[1], 4), kv[0]))  # fixed order, ties broken by text
    return [(tok, 0.0) for tok in SPECIAL] + [(piece, round(score, 4)) for piece, score in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--miniworld", action="store_true", help="add the miniature world's caption words")
    parser.add_argument("--extra-ids", type=int, default=100, help="<extra_id_N> sentinels appended, as T5 has")
    args = parser.parse_args()

    from transformers import T5Tokenizer

    vocab = build_vocab(args.miniworld)
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(args.extra_ids))]  # as T5's, <extra_id_0> last
    tokenizer = T5Tokenizer(vocab=vocab + sentinels, extra_ids=args.extra_ids, model_max_length=512)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out_dir)
    sks = tokenizer("sks").input_ids
    print(f"wrote {len(tokenizer)} tokens ({len(vocab)} pieces + {args.extra_ids} sentinels) to {args.out_dir}; "
          f"pad/eos/unk = {tokenizer.pad_token_id}/{tokenizer.eos_token_id}/{tokenizer.unk_token_id}; 'sks' -> {sks}")


if __name__ == "__main__":
    main()
