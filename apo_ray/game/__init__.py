"""Algorithm 1: the GameSystem protocol and its types, the game's data, the round loop, the phase
checkpoint and the phase plan. Imports nothing of outputs/ or runtime/."""
