"""How the toy model is asked by default; no imports, so the command line's help can name it at once."""

DEMO_INSTRUCTION = "swap red and blue"  # what `step1x-export demo` asks of it
