# Sourced by the device scripts (from the repo root): the checkout on PYTHONPATH (the package need not be
# installed), and the package's dependencies the GPU machine lacks (einops, jsonschema) installed from wheels
# carried in .whl/ into a private folder: no index is reached there and the machine's own packages are not
# touched. Fill .whl/ on a machine with an index (see benchmarks/README.md).
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NEEDED="einops jsonschema"
DEPS="${STEP1X_DEPS_DIR:-/tmp/step1x_deps}"
export PYTHONPATH="$PYTHONPATH:$DEPS"  # installed there by an earlier call on the same machine
missing=$(for m in $NEEDED; do python3 -c "import $m" 2>/dev/null || echo "$m"; done)
if [ -n "$missing" ]; then
    echo "installing from .whl/ into $DEPS: $missing"
    if ! python3 -m pip install -q --no-index --find-links "$PWD/.whl" --target "$DEPS" $missing; then
        echo "cannot import: $missing; put their wheels in .whl/ (benchmarks/README.md) and carry it"
        exit 3
    fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import sys, torch, transformers, einops, jsonschema; from importlib.metadata import version as v; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, \
'einops', einops.__version__, 'jsonschema', v('jsonschema'))"
