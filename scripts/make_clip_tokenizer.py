"""Derive a CLIP BPE tokenizer folder (vocab.json + merges.txt) from CLIP's merges file.

CLIP's vocabulary is built from its merge list (openai/CLIP `simple_tokenizer.py`): the 256
byte characters, the same with an end-of-word marker, one token per merge, then the two special
tokens. Truncating the merge list therefore gives a smaller tokenizer that still splits every
string the same way the full one would up to that merge, which is what the tests need; the full
list gives the exact 49,408-token tokenizer Stable Diffusion uses (`sks` is token 48136).

The merges file ships inside the open-clip-torch wheel as `open_clip/bpe_simple_vocab_16e6.txt.gz`:

    pip download --no-deps -d /tmp/oc open-clip-torch && unzip /tmp/oc/*.whl '*bpe_simple*'
    python scripts/make_clip_tokenizer.py open_clip/bpe_simple_vocab_16e6.txt.gz src/dreambooth/assets/clip_tokenizer --merges 2000
"""

import argparse
import gzip
import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table, which CLIP reuses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--merges", type=int, default=49152 - 256 - 2, help="how many merges to keep (default: all of CLIP's)")
    args = parser.parse_args()

    lines = gzip.open(args.bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 1 + args.merges]]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (args.out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (args.out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens to {args.out_dir}")


if __name__ == "__main__":
    main()
