"""dreambooth: teach a text-to-image diffusion model a new subject or style from a few photos."""

import logging

__version__ = "0.1.0"

# bitsandbytes (our 8-bit AdamW moments; peft imports it too) warns on import, on a CPU with
# AVX-512 BF16, that an optional 4-bit matmul kernel could not be fetched through the `kernels`
# package. We use no 4-bit matmul, and nothing may be fetched at run time, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# diffusers' pipeline modules import transformers' CLIPImageProcessor and SiglipImageProcessor when they
# load, and without torchvision (which we do not depend on, on purpose) transformers says each "requires
# torchvision (not installed); falling back to `...Pil`". That fallback is what we want, we use no image
# processor (verification passes the feature extractor as None), and the user can do nothing about the
# note; only it is dropped.
class _NoImageProcessorFallbackNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallbackNote())
