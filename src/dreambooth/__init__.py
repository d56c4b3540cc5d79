"""dreambooth: teach a text-to-image diffusion model a new subject or style from a few photos."""

__version__ = "0.1.0"
