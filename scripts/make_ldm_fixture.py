"""Write tiny single-file checkpoints with the *original* Stable Diffusion code, for tests/fixtures/.

Our single-file tables must be checked against a file we did not lay out ourselves. This script
builds the networks with CompVis/Stability's own classes (`ldm.modules.diffusionmodules.openaimodel.UNetModel`,
`ldm.modules.diffusionmodules.model.Encoder/Decoder`, packaged on PyPI as stable-diffusion-sdkit),
so every key name and tensor shape comes from that code, and saves their state dicts under the
prefixes of the released checkpoints. Beside the weights it stores reference outputs of those
same networks on fixed inputs; the test converts the file and compares.

- ldm_sd1.safetensors: SD 1.x layout - UNet with conv projections, VAE, CLIP text encoder
  (transformers' CLIP is what LDM's FrozenCLIPEmbedder wraps; its keys keep `text_model.`).
- ldm_sd2.safetensors: only SD 2.x's UNet variant (linear projections, heads from num_head_channels);
  the test completes it with sd1's VAE and text encoder.

Weights are rounded to fp16 (stored so: the fixtures stay small); references are computed in fp32
from those rounded weights. Run once, outside the project's environment (the LDM package pins old
versions of everything, so install it without dependencies):

    pip install --no-deps --target /tmp/ldm stable-diffusion-sdkit==2.1.5 einops
    PYTHONPATH=/tmp/ldm python scripts/make_ldm_fixture.py tests/fixtures
"""

import sys
from pathlib import Path

import torch
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from dreambooth.tiny import TOKENIZER_DIR

# The UNet hyperparameters as LDM's yaml files give them (v1-inference.yaml / v2-inference.yaml), shrunk.
UNETS = {
    "sd1": dict(num_heads=2, use_linear_in_transformer=False),
    "sd2": dict(num_head_channels=16, use_linear_in_transformer=True),
}
VAE = dict(ch=32, out_ch=3, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=[], in_channels=3, resolution=32,
           z_channels=4, double_z=True)


def rounded(module: torch.nn.Module) -> torch.nn.Module:
    """Weights made exactly representable in fp16, so the fp16 file holds what the references used."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module.eval()


class FirstStage(torch.nn.Module):
    """LDM AutoencoderKL's weights without its Lightning wrapper (which only adds training code)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = Encoder(**VAE), Decoder(**VAE)
        self.quant_conv = torch.nn.Conv2d(2 * VAE["z_channels"], 2 * 4, 1)
        self.post_quant_conv = torch.nn.Conv2d(4, VAE["z_channels"], 1)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    for name, extra in UNETS.items():
        torch.manual_seed(0)
        unet = rounded(UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 1),
                                 num_res_blocks=1, attention_resolutions=[1], use_spatial_transformer=True,
                                 transformer_depth=1, context_dim=32, legacy=False, **extra))
        vae = rounded(FirstStage())
        text = rounded(CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).text_model)
        state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
        if name == "sd1":
            state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
            state.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.state_dict().items()})
        g = torch.Generator().manual_seed(1)
        x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 6, 32, generator=g)
        z, ids = torch.randn(1, 4, 4, 4, generator=g), torch.randint(0, len(tokenizer), (2, 77), generator=g)
        with torch.no_grad():
            refs = {"ref.unet.x": x, "ref.unet.t": t, "ref.unet.context": context, "ref.unet.out": unet(x, t, context=context),
                    "ref.vae.z": z, "ref.vae.out": vae.decoder(vae.post_quant_conv(z)),
                    "ref.text.ids": ids, "ref.text.out": text(input_ids=ids).last_hidden_state}
        tensors = {k: v.half().contiguous() for k, v in state.items() if v.is_floating_point()}
        tensors.update({k: v.contiguous() for k, v in state.items() if not v.is_floating_point()})
        save_file(tensors, str(out / f"ldm_{name}.safetensors"), metadata={"written_by": "ldm (stable-diffusion-sdkit 2.1.5)"})
        save_file({k: v.contiguous() for k, v in refs.items()}, str(out / f"ldm_{name}_reference.safetensors"))
        print(f"{name}: {len(tensors)} tensors, {sum(v.numel() for v in tensors.values()):,} values")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
