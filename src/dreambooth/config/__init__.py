"""Training configuration: typed dataclasses, the single source of truth.

The command line (`dreambooth train --optim.lr 2e-6`), YAML files (`optim: {lr: 2e-6}`), the
presets and the resolved `config.yaml` written beside every checkpoint are all instances of
`TrainConfig`. Each field documents itself through `metadata["help"]`, which is what
`dreambooth train --help` prints. Unknown keys and inconsistent settings raise a
`DreamBoothError` that names the key (litgpt's `args.py` is the model for this).

- `schema.py`: the dataclasses, one per section, and each section's own checks;
- `checks.py`: the checks across sections, run by `TrainConfig.validate()`;
- `parsing.py`: dicts, YAML files and dotted overrides in, dicts and YAML out; `type_name`.
"""

from .parsing import (build_config, deep_merge, dotted_to_nested, from_dict, iter_fields, load_yaml, to_dict, type_name,
                      yaml_text)
from .schema import (IDENTIFIER_EMBEDDING_LR, SAMPLERS, TEXT_ENCODER_SECTIONS, CheckpointConfig, ConceptConfig,
                     DataConfig, EMAConfig, ExportConfig, LoRAConfig, MemoryConfig, ModelConfig, MonitorConfig,
                     ObjectiveConfig, OptimConfig, PriorConfig, Sampler, TextEncoderConfig, TrainConfig,
                     TrainLoopConfig, ValidationConfig)

__all__ = [
    "CheckpointConfig", "ConceptConfig", "DataConfig", "EMAConfig", "ExportConfig", "IDENTIFIER_EMBEDDING_LR",
    "LoRAConfig", "MemoryConfig", "ModelConfig", "MonitorConfig", "ObjectiveConfig", "OptimConfig", "PriorConfig",
    "SAMPLERS", "Sampler", "TEXT_ENCODER_SECTIONS", "TextEncoderConfig", "TrainConfig", "TrainLoopConfig",
    "ValidationConfig", "build_config", "deep_merge", "dotted_to_nested", "from_dict", "iter_fields", "load_yaml",
    "to_dict", "type_name", "yaml_text",
]
