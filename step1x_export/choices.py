"""What the command line offers as choices, as plain data: `--help` lists them without importing torch.

Each name belongs to the module named beside it, which takes it from here; a table keyed by these names
(recipes, plan presets, weight-only formats) is checked against them in tests/test_cli.py.
"""

from __future__ import annotations

COMPONENTS = ("vision", "llm", "dit", "vae_encoder", "vae_decoder")  # specs: the exported graphs
BENCH_STAGES = ("mllm", "connector", "dit_step", "vae_encode", "vae_decode", "edit")  # bench.stages
DTYPES = ("fp32", "bf16", "fp16")  # the float dtypes a model runs in (cli.common.torch_dtype)
RECIPES = ("fp8", "int8-sq")  # calibrate.recipes.RECIPES
DIT_QUANT = ("none", *RECIPES)  # plan.plan: the DiT's W8A8 recipe, if any
WEIGHT_ONLY = ("none", "fp8", "int8")  # calibrate.weight_only.WEIGHT_ONLY_FORMATS
MLLM_QUANT = (*WEIGHT_ONLY, "int4")  # runtime.engines.mllm.prepare_mllm: 8-bit weight-only or calibrate.int4
PLAN_PRESETS = ("bf16", "fp8", "24gb")  # plan.plan.PRESETS (configurations; "24gb": all resident, first light's)
MEMORY_PRESETS = ("24gb", "22gb", "16gb", "12gb", "8gb")  # presets.PRESETS: one per card size, every term counted
ATTENTION = ("auto", "flash", "cudnn", "efficient", "math")  # runtime.step.attention: the SDPA kernel choices
# runtime.options: captured graphs kept per runtime (one per edit resolution, least recently used evicted
# first). A graph holds its own memory pool (the step's activations at that size); 4 keeps the working set of
# a few common sizes warm while bounding memory when a server sees every aspect ratio.
DEFAULT_GRAPH_CACHE = 4
# runtime.options: v1.2's text bucket where both CFG branches share one DiT call (the text rounded up to a
# multiple of this many tokens): a CUDA graph per bucket, and at most this many padded tokens per branch.
# v1.2's texts (its image's 256-400 vision tokens and the instruction) fall in a few such buckets.
TEXT_BUCKET = 64
# runtime.batching: edits per batch; far past where a step's cost stops amortising on any device
MAX_BATCH = 64
# The modulation Linears: 3.2 B of the DiT's 12.4 B parameters, acting on one vector per sample.
MODULATION = ("*_mod.lin", "*.modulation.lin")
# calibrate.recipes: kept in high precision by default. The embedders and the final layer are what FP8
# deployments of FLUX keep (they see raw inputs / produce the output, and are a negligible share of the
# FLOPs); the connector runs once per step on 640 text tokens; the modulation Linears act on one vector per
# sample (no GEMM speed to gain, M = batch) and scale every token of their block, so their error is
# amplified. v1.2's text_token_mapping sees raw token embeddings, like the embedders.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "img_in", "txt_in", "time_in.*", "vector_in.*", "final_layer.*", "connector.*", "text_token_mapping",
    *MODULATION,
)
# calibrate.qcheckpoint: what W8A8's default selection keeps in high precision and weight-only 8 bits can
# take: the modulation Linears and the connector (0.5 B parameters, 640 text tokens per step).
WEIGHT_ONLY_DEFAULT = (*MODULATION, "connector.*")
