"""`python -m step1x_export.cli` (also what `torchrun -m step1x_export.cli` launches on every rank)."""

from . import main

main(prog_name="step1x-export")
