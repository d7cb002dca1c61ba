"""`edit`'s options past one GPU's kernels: step caching and one edit across torchrun's ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["cache_fidelity", "is_leader", "speedup_options"]


def is_leader() -> bool:
    """Rank 0 of a parallel run, or the only process (what writes and reports)."""
    from ..runtime.parallel.layout import is_leader as leader

    return leader()


def _check_cache(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from ..runtime.step.caching import CacheSpec

    try:
        return str(CacheSpec.parse(value))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def speedup_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--cache and the parallel degrees, as one block of options."""
    options = [
        click.option("--cache", callback=_check_cache, metavar="teacache[:T]|fbcache[:T]|regione[:K=V,...]",
                     help="Step caching (torch backend): reuse the DiT blocks' residual on steps whose input barely "
                          "moved. teacache = upstream's TeaCache rule (default T 0.2; 0.4 / 0.6 skip more), fbcache = "
                          "First-Block Cache (default T 0.08). regione = RegionE: after 6 full steps only the tokens "
                          "the edit changes are denoised (attending to cached keys and values of the rest), some "
                          "of their steps reusing the velocity; 28 steps, one edit at a time; settings threshold "
                          "(0.88), cache (0.02), warmup (6), post (2), refresh (16; steps joined by +), erode (1), "
                          "ref_kv (1: the reference tokens' keys and values cached; 0 recomputes them). "
                          "Prints the DiT calls computed and reused."),
        click.option("--compare-uncached/--no-compare-uncached", default=None,
                     help="With --cache, also run the edit without it and print the latent's and the image's PSNR "
                          "against that [default: on for --model tiny, off otherwise: it doubles the denoising]."),
        click.option("--cfg-degree", type=click.IntRange(1, 2), default=1, show_default=True,
                     help="Ranks splitting the CFG batch (2: cond on one, uncond on the other). Launch with "
                          "`torchrun --nproc-per-node N` where N = cfg x ulysses x ring degrees (one GPU per rank; "
                          "gloo on CPU). Weights are replicated on every rank."),
        click.option("--ulysses-degree", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Ranks splitting the sequence with Ulysses attention (all-to-all over heads; must divide "
                          "the 24 heads: 2, 3, 4, 6, 8)."),
        click.option("--ring-degree", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Ranks splitting the sequence with ring attention (K/V passed around the ring)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def cache_fidelity(cached_latent: Any, cached: Image.Image, plain_latent: Any, plain: Image.Image) -> str:
    """One line: the cached edit's latent PSNR (peak = the latent's range) and 8-bit image PSNR vs no cache."""
    from ..bench.ladder import psnr  # the metrics live with their main users; imported only when asked for
    from ..calibrate.evaluate import psnr_db

    return (f"vs no cache: latent PSNR {psnr(cached_latent, plain_latent):.2f} dB, "
            f"image PSNR {psnr_db(cached, plain):.2f} dB")
