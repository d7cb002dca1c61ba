"""DiT blocks streamed from host memory to the device a few blocks ahead of their use, freed after it."""
