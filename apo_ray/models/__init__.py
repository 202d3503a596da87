"""One process, torch, no game and no Ray actors: model loading, generators (transformers, vLLM),
the reward scorer, the learners and weight packing."""
