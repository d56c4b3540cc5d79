"""The identifier's trained token embedding beside a LoRA, as a textual-inversion file.

A LoRA adapter cannot change a token's input embedding, so with train.method=lora and
text_encoder.scope=identifier the export writes what trained there as one file per identifier,
`embeddings/<identifier>.safetensors`: one key, the identifier, holding the embeddings of the
tokens it splits into, in order (shape [tokens, dim]). That is the single-key layout diffusers'
`load_textual_inversion` reads, and A1111's and ComfyUI's embeddings folders too; those two take
the file name as the word that triggers it, so prompts stay "a photo of sks dog" everywhere.

diffusers adds the identifier to the tokenizer as a new token (`sks`, and `sks_1`, ... when it is
more than one piece) whose rows hold these vectors: the text encoder then sees the vectors it was
trained with at the same positions. It refuses a name the vocabulary already holds (CLIP's holds
`sks</w>`, not `sks`), so such an identifier is refused before training (`check_identifiers`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import DreamBoothError
from ..models.trainable import encoder_tokenizer

EMBEDDINGS_DIR = "embeddings"


def check_identifiers(cfg, comps) -> None:
    """Refuse, before training, a LoRA run's identifier that cannot be saved and loaded back as a textual-inversion token."""
    encoders = [name for name, te in cfg.text_encoders().items() if te.train and te.scope == "identifier"]
    if cfg.train.method != "lora" or not encoders:
        return
    vocab = encoder_tokenizer(comps, encoders[0]).get_vocab()
    for word in (c.resolved_identifier for c in cfg.resolved_concepts()):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", word):
            raise DreamBoothError(f"concept.identifier {word!r}: a LoRA saves the trained identifier as the file "
                                  f"{EMBEDDINGS_DIR}/{word}.safetensors, so it must be one word of letters, digits, "
                                  f"'_', '.' or '-'; choose another (`dreambooth identifier` lists rare ones)")
        if word in vocab:
            raise DreamBoothError(f"concept.identifier {word!r} is already a token of {encoders[0]}'s tokenizer, so "
                                  f"diffusers' load_textual_inversion would refuse the LoRA's trained embedding of it; "
                                  f"choose another identifier (`dreambooth identifier` lists rare ones)")


def identifier_vectors(comps, encoder: str, word: str) -> torch.Tensor:
    """The embeddings of the tokens `word` splits into, in order (what a prompt with `word` feeds the encoder)."""
    ids = encoder_tokenizer(comps, encoder)(word, add_special_tokens=False).input_ids
    table = comps.modules[encoder].get_input_embeddings().weight
    return table[ids].detach().float().cpu().clone()


def embedding_encoder(trainable) -> str | None:
    """The text encoder whose identifier rows trained, if any. Only families with one text encoder write the
    file (`ModelFamily.identifier_embedding_file`), so there is at most one."""
    return next(iter(trainable.identifier_embeddings), None)


def save_identifier_embeddings(comps, folder: Path, trainable) -> None:
    """Write each trained identifier's embedding under `folder` (nothing when no identifier trained)."""
    from safetensors.torch import save_file

    encoder = embedding_encoder(trainable)
    for word in trainable.identifiers if encoder else ():
        path = Path(folder) / EMBEDDINGS_DIR / f"{word}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({word: identifier_vectors(comps, encoder, word)}, path)


def load_identifier_embeddings(pipe, folder: Path) -> None:
    """Load a LoRA output's identifier embeddings into `pipe` (after its adapters), as any diffusers user would."""
    for path in sorted((Path(folder) / EMBEDDINGS_DIR).glob("*.safetensors")):
        pipe.load_textual_inversion(str(path))


@torch.no_grad()
def encoded(pipe, prompt: str) -> torch.Tensor:
    """`prompt` through the pipeline's own tokenizer (textual-inversion tokens expanded) and text encoder."""
    if hasattr(pipe, "maybe_convert_prompt"):
        prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    encoder = pipe.text_encoder
    return encoder(ids.to(encoder.device)).last_hidden_state.float().cpu()
