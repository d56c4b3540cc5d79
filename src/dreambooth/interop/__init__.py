"""Other tools' formats in and out (single files, kohya LoRA, textual inversion) and the checks that
every written model loads back through code that is not ours.

Importing this package quiets one warning a user cannot act on. diffusers' pipeline modules import
transformers' `CLIPImageProcessor` and `SiglipImageProcessor` when they load, so every pipeline we
build (validation, export verification, sampling) makes transformers say "`CLIPImageProcessor`
requires torchvision (not installed); falling back to `CLIPImageProcessorPil`". We use no image
processor (verification passes the feature extractor as None, `verify.user_pipeline`) and do not
depend on torchvision on purpose, so that fallback is exactly right; only this message is dropped.
"""

import logging


class _NoImageProcessorFallbackNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# transformers.utils.import_utils logs it (transformers' own logger tree; a logger's filters see its records)
logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallbackNote())
