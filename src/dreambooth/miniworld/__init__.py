"""The miniature world: a procedural image world, a tiny SD-architecture base model pretrained on
it, and a classifier that measures DreamBooth's subject fidelity, prompt fidelity and drift."""
