"""`python -m step1x_export.cli`: the `step1x-export` command without the installed script."""

from . import main

main(prog_name="step1x-export")
