"""The denoising step over an engine: the DiT as the loop's step function (`engine_step`), and what makes it
fast without changing the loop: CUDA graphs (`cudagraph`), the attention kernel (`attention`), step caching
(`cache_spec`, `caching` over `split_dit`'s pieces) and lane-exact batched calls (`lane_gemms`).
"""
