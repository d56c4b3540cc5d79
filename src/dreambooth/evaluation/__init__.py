"""Measuring trained models on real images: DreamBench's metrics (`real.py`) over local DINO / CLIP folders (`embedders.py`)."""
