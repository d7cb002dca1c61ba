"""One edit across several ranks (torchrun): CFG parallel, Ulysses sequence parallel and ring attention.

`degrees.ParallelDegrees` says the layout (world size = cfg x ring x ulysses); `dit.ParallelDiT` wraps the
reference DiT as another torch engine, so the runtime's one denoising loop runs unchanged on every rank;
`attention` holds Ulysses and the ring.
"""
