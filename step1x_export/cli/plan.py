"""`step1x-export plan`: device memory per stage of an edit, for any configuration, without weights."""

from __future__ import annotations

import json

import click

from ..choices import DEFAULT_GRAPH_CACHE, DIT_QUANT, MEMORY_PRESETS, PLAN_PRESETS, WEIGHT_ONLY
from ..step1x_ref.configs import CONFIGS
from .common import user_errors


@click.command()
@click.option("--version", "model", type=click.Choice(list(CONFIGS)), default="v1.1", show_default=True,
              help="Model config (the real v1.0 / v1.1, or a tiny one).")
@click.option("--size-level", type=click.IntRange(16, 4096), default=1024, show_default=True,
              help="Edit resolution: a square image of about size_level^2 pixels.")
@click.option("--width", type=click.IntRange(16), default=None, help="Input image width (with --height): its aspect "
              "ratio at size_level, as the edit resizes it [default: square].")
@click.option("--height", type=click.IntRange(16), default=None, help="Input image height (with --width).")
@click.option("--preset", type=click.Choice(list(dict.fromkeys(PLAN_PRESETS + MEMORY_PRESETS))), default=None,
              help="A card-size preset, every term counted (24gb: 4090 / A5000, 22gb: L4 / A10, 16gb, 12gb, 8gb: "
                   "placement, formats, streaming, workspaces, margin, host RAM, PCIe bytes and projected seconds "
                   "per edit), or a configuration: bf16, fp8 (W8A8 DiT). Overrides the quantization, load and "
                   "graph options.")
@click.option("--think", is_flag=True, help="v1.2: count the MLLM rewriting the instruction (its LM head, the "
              "KV cache at the published 128 new tokens).")
@click.option("--reflect", type=click.IntRange(0, 10), default=0, show_default=True,
              help="v1.2: reflection rounds (an edit and a judgement of two images each; the candidates wait on the "
                   "host).")
@click.option("--quant", type=click.Choice(DIT_QUANT), default="none", show_default=True,
              help="The DiT's W8A8 recipe with its default layer selection.")
@click.option("--weight-only", type=click.Choice(WEIGHT_ONLY), default="none", show_default=True,
              help="The DiT's modulation and connector Linears as 8-bit weight-only layers.")
@click.option("--mllm-quant", type=click.Choice(WEIGHT_ONLY), default="none", show_default=True,
              help="Qwen2.5-VL's Linears as 8-bit weight-only layers (the unused LM head is always dropped).")
@click.option("--sequential-load", is_flag=True, help="One stage on the device at a time (as the runtime's option).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="As the runtime's option: each captured denoising step keeps a memory pool of the DiT's "
                   "activation peak between edits (counted in every stage; dropped with the DiT when sequential).")
@click.option("--graph-cache", type=click.IntRange(1, 1000), default=DEFAULT_GRAPH_CACHE, show_default=True,
              help="Captured graphs kept (as the runtime's option): one pool each, counted at this plan's size.")
@click.option("--budget-gib", type=click.FloatRange(min=0.1), default=None,
              help="Exit with status 2 if the plan's peak exceeds this many GiB (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (bytes per stage) instead of a table.")
@user_errors
def plan(model: str, size_level: int, width: int | None, height: int | None, preset: str | None, think: bool,
         reflect: int, quant: str, weight_only: str, mllm_quant: str, sequential_load: bool, cuda_graphs: bool,
         graph_cache: int, budget_gib: float | None, as_json: bool) -> None:
    """Print the device memory of one edit, stage by stage: the weights each stage holds, its activation
    peak (a forward traced on meta tensors from the real configs: no weights, no GPU, seconds), the CUDA
    graphs' pools, the CUDA context (a stated constant) and the total while it runs. A card-size --preset
    also counts library workspaces, streaming buffers and a fragmentation margin against 95 % of its card,
    and prints the host RAM, the PCIe bytes and a projected time per edit (a roofline from stated rates).
    """
    if (width is None) != (height is None):
        raise click.UsageError("give both --width and --height, or neither")
    from ..plan.plan import GiB, PlanConfig, make_plan

    if preset in MEMORY_PRESETS:
        if width is not None:
            raise click.UsageError(f"--preset {preset} plans a square edit at --size-level; drop --width/--height")
        result = _preset_plan(preset, model, size_level, think, reflect, as_json)
    else:
        config = PlanConfig(quant=quant, weight_only=weight_only, mllm_quant=mllm_quant,
                            sequential_load=sequential_load, cuda_graphs=cuda_graphs, graph_cache=graph_cache)
        result = make_plan(model, size_level, config=config, preset=preset, width=width, height=height, think=think,
                           reflect=reflect)
        click.echo(json.dumps(result.as_json(), indent=2) if as_json else result.table())
    if budget_gib is not None and result.total > budget_gib * GiB:
        click.echo(f"plan peak {result.total / GiB:.2f} GiB exceeds --budget-gib {budget_gib}", err=True)
        raise SystemExit(2)


def _preset_plan(preset: str, model: str, size_level: int, think: bool, reflect: int, as_json: bool):
    from ..plan.preset_plan import Mode, make_preset_plan, table
    from ..plan.roofline import CARDS, project

    result = make_preset_plan(preset, Mode(model, think, reflect), size_level)
    projections = [project(result, card) for card in CARDS.values()]
    if as_json:
        rooflines = {x.card: {"seconds": round(x.seconds, 2), "resident_seconds": round(x.resident_seconds, 2)}
                     for x in projections}
        click.echo(json.dumps(result.as_json() | {"projected_seconds_roofline": rooflines}, indent=2))
    else:
        click.echo(table(result, projections))
    return result
