"""`step1x-export models`: the models a name stands for, and what each can be asked."""

from __future__ import annotations

import click

from ..instructions import KnownTasks
from ..step1x_ref.configs import get_config
from .common import SMALL_MODELS, user_errors


@click.command()
@click.argument("names", nargs=-1, type=click.Choice(SMALL_MODELS))
@user_errors
def models(names: tuple[str, ...]) -> None:
    """The models `--model NAME` runs (all, or NAMES), each with its edit sizes and, for a model that learned
    only a few instructions (toy), its tasks and every phrasing it learned: other instructions give no real
    edit, and `edit` warns about them (`--strict` refuses them). A model folder (`--model-dir`) follows open
    instructions, unless it carries a tasks.json like the toy's.
    """
    from ..sources import PACKAGED, known_tasks
    from ..step1x_ref.profiles import profile_for

    for name in names or SMALL_MODELS:
        config, profile = get_config(name), profile_for(get_config(name))
        weights = "trained here, weights shipped in the package" if name in PACKAGED else "random weights"
        click.echo(f"{name}: {config.version}, {weights}; size levels {profile.min_level}..{profile.max_level} "
                   f"(default {profile.max_level}{', others refused' if profile.learned else ''}), "
                   f"{config.default_steps} steps, cfg {config.default_cfg:g}")
        known = known_tasks(name)
        if known is not None:
            click.echo(task_lines(known))
        elif name not in PACKAGED:
            click.echo("  no instruction makes a real edit: it shows the pipeline runs and where the time goes")


def task_lines(known: KnownTasks) -> str:
    """The tasks, one a line, each followed by its phrasings (quoted, as they must be typed)."""
    lines = [f"  {len(known.tasks)} tasks, learned in exactly these phrasings (others give no real edit):"]
    for task, phrasings in known.tasks.items():
        lines.append(f"    {task}: " + " | ".join(f'"{p}"' for p in phrasings))
    return "\n".join(lines)
