# Sourced by the device scripts (from the repo root): the checkout on PYTHONPATH (the package need not be
# installed), and any pure-Python wheel carried in .whl/ (einops: the GPU machine's environment lacks it)
# importable straight from its zip file, so nothing is installed and nothing is downloaded there.
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for wheel in "$PWD"/.whl/*-py3-none-any.whl; do
    [ -e "$wheel" ] && export PYTHONPATH="$PYTHONPATH:$wheel"  # after the environment's own packages
done
if ! python3 -c "import einops" 2>/dev/null; then
    echo "einops is not importable: put its wheel in .whl/ (pip download einops --no-deps -d .whl) and carry it"
    exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import sys, torch, transformers, einops; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'transformers', transformers.__version__, 'einops', einops.__version__, 'from', einops.__file__)"
