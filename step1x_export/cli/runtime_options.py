"""The runtime's command-line options, declared once: what runs (model / export / engines, backend, quant)
and how (device, dtype, CUDA graphs, compile, graph cache, sequential load). `edit` and `bench` (and any
later command that serves edits) take the same flags with the same help and the same checks.

    @click.command()
    @runtime_options()
    def edit(runtime: RuntimeArgs, ...) -> None:
        with runtime.load() as rt: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..choices import ATTENTION, DTYPES, MEMORY_PRESETS, MLLM_QUANT
from ..instructions import KnownTasks
from ..runtime.options import BACKENDS, DEFAULT_GRAPH_CACHE, RuntimeOptions, changed_fields
from .common import DEVICE, SMALL_MODELS, lora_option, torch_dtype, version_option

if TYPE_CHECKING:
    from ..runtime.runtime import Step1XEditRuntime



@dataclass(frozen=True)
class RuntimeArgs:
    """The runtime flags of one command invocation, checked; `load()` builds the runtime they describe."""

    model_dir: Path | None = None
    model_name: str | None = None
    backend: str = "torch"
    engine_dir: Path | None = None
    quant: Path | None = None
    version: str | None = None
    loras: tuple[str, ...] = ()  # FILE[:SCALE] each, merged into the torch DiT in order
    dtype: str | None = None
    device: str | None = None
    cuda_graphs: bool = True
    compile: bool | None = None
    compile_mode: str | None = None
    graph_cache: int = DEFAULT_GRAPH_CACHE
    shape_buckets: bool = False
    sequential_load: bool | str = False  # True: from disk, "host": swapped from host memory
    mllm_quant: str | None = None
    preset: str | None = None
    attention: str = "auto"
    exact_batches: bool | None = None
    text_bucket: int | None = None
    threads: int | None = None
    resident_blocks: int | None = None
    prefetch_blocks: int | None = None

    def known_tasks(self) -> KnownTasks | None:
        """The only instructions the model learned, where it learned only a few (the toy's); None: any."""
        from ..sources import known_tasks

        return next(filter(None, map(known_tasks, (self.model_dir, self.model_name, self.engine_dir))), None)

    def check_source(self) -> None:
        """One-line usage errors for a combination of flags that names no model or mixes backends."""
        if self.model_dir is not None and self.model_name is not None:
            raise click.UsageError("give --model-dir DIR or --model tiny, not both")
        if self.backend == "torch" and self.model_dir is None and self.model_name is None:
            raise click.UsageError("--backend torch needs --model-dir DIR or --model tiny")
        if self.backend == "torch" and self.engine_dir is not None:
            raise click.UsageError("--engine-dir is for --backend onnxruntime or tensorrt")
        if self.backend != "torch" and self.engine_dir is None:
            raise click.UsageError(f"--backend {self.backend} needs --engine-dir")
        if self.quant is not None and self.backend != "torch":
            raise click.UsageError("--quant applies to --backend torch (exported graphs carry their own quantization)")
        if self.loras and self.backend != "torch":
            raise click.UsageError("--lora applies to --backend torch; an export holds the weights it was made from "
                                   "(merge the LoRA with `step1x-export export --lora FILE`)")
        if self.compile and self.backend != "torch":
            raise click.UsageError(f"--compile applies to --backend torch; {self.backend} runs its own graphs")
        if self.preset is not None and self.backend == "torch":
            from ..calibrate.qcheckpoint import read_qcheckpoint_info
            from ..presets import INT4_DIT_COMMAND, get_preset

            if self.quant is None or read_qcheckpoint_info(self.quant) is None:
                make = (INT4_DIT_COMMAND if get_preset(self.preset).dit_int4
                        else "step1x-export quantize --artifact FP8_ARTIFACT --weight-only int8")
                raise click.UsageError(f"--preset {self.preset} needs --quant FILE, a quantized checkpoint "
                                       f"(`{make}`): the bf16 DiT does not fit")

    def options(self, **overrides: Any) -> RuntimeOptions:
        """The `RuntimeOptions` these flags ask for (precision from --dtype; bf16 when unset)."""
        from ..runtime.runtime import precision_of

        precision = precision_of(torch_dtype(self.dtype)) if self.dtype else RuntimeOptions().precision
        base = RuntimeOptions(backend=self.backend, precision=precision, cuda_graphs=self.cuda_graphs,  # type: ignore[arg-type]
                              compile=self.compile, compile_mode=self.compile_mode, graph_cache=self.graph_cache,
                              shape_buckets=self.shape_buckets, sequential_load=self.sequential_load,
                              mllm_quant=self.mllm_quant, attention=self.attention, preset=self.preset,
                              exact_batches=self.exact_batches,
                              text_bucket=self.text_bucket, threads=self.threads,
                              resident_blocks=self.resident_blocks, prefetch_blocks=self.prefetch_blocks)
        return replace(base, **overrides)

    def load_kwargs(self) -> dict[str, Any]:
        """`Step1XEditRuntime.load`'s arguments: (source, backend) and the keywords."""
        from ..step1x_ref.weights.lora import LoraSpec

        self.check_source()
        if self.backend == "torch":
            source, mllm = (self.model_dir if self.model_dir is not None else self.model_name), None
        else:
            source = self.engine_dir
            mllm = self.model_name if self.model_dir is None else self.model_dir  # either layout
        # The flags' RuntimeOptions as load's keywords; the precision travels as dtype, so that without --dtype
        # load picks the device's default.
        options = {k: v for k, v in changed_fields(self.options()).items() if k != "precision"}
        return {
            "source": source, "backend": self.backend, "quant": self.quant, "device": self.device,
            "dtype": torch_dtype(self.dtype) if self.dtype else None, "version": self.version, "mllm": mllm,
            "loras": [LoraSpec.parse(spec) for spec in self.loras], **options,
        }

    def load(self) -> Step1XEditRuntime:
        from ..runtime import Step1XEditRuntime

        return Step1XEditRuntime.load(**self.load_kwargs())


def _source_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    return [
        click.option("--model-dir", type=click.Path(path_type=Path), help="Model folder, in either layout "
                     "(detected): the official files (v1.0: step1x-edit-i1258[-FP8].safetensors, v1.1: "
                     "step1x-edit-v1p1-official.safetensors, vae.safetensors, Qwen2.5-VL-7B-Instruct/) or the "
                     "diffusers layout (model_index.json, transformer/, vae/, text_encoder/, processor/). With "
                     "--engine-dir only its Qwen2.5-VL is used."),
        click.option("--model", "model_name", type=click.Choice(list(SMALL_MODELS)),
                     help="Use a small model instead of --model-dir: toy (trained here, does the edits of "
                     "`step1x_export.toy.tasks` at size levels 64 to 160, up to 2:1), toy-v1.2 (the toy fine-tuned "
                     "through v1.2's prompt path: the same edits) or tiny (random weights, "
                     "testing; not a real edit). With --engine-dir, --model/--model-dir only name a torch MLLM "
                     "to use instead of the export's vision/llm graphs."),
        click.option("--backend", type=click.Choice(list(BACKENDS)), default="torch", show_default=True,
                     help="What runs the VAE and DiT: PyTorch, ONNX Runtime (needs --engine-dir from `step1x-export "
                     "export`) or TensorRT (--engine-dir from `step1x-export build`). The MLLM runs in torch."),
        click.option("--engine-dir", type=click.Path(path_type=Path, file_okay=False),
                     help="Export folder (onnxruntime) or engine folder (tensorrt)."),
        click.option("--quant", type=click.Path(path_type=Path, dir_okay=False),
                     help="Calibration artifact (`step1x-export calibrate`) applied to the torch DiT (FP8 / INT8 "
                     "W8A8), or a quantized checkpoint (`step1x-export quantize`) loaded as the DiT without a bf16 "
                     "copy."),
        version_option(),
        lora_option("(torch backend; an export carries the LoRAs merged when it was made)", "loras"),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                     help="DiT/MLLM dtype [default: bf16 for --model-dir on a GPU, else fp32]; the VAE runs in fp32."),
    ]


def _execution_options() -> dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]]:
    return {
        "device": click.option("--device", type=DEVICE, default=None,
                               help="torch device: cpu, cuda, cuda:N [default: cuda if available, else cpu]."),
        "cuda_graphs": click.option(
            "--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
            help="Capture the whole denoising step once per edit size and replay it (torch and tensorrt backends on "
            "CUDA; ignored on CPU and for onnxruntime, whose kernels run on ORT's own stream)."),
        "graph_cache": click.option(
            "--graph-cache", type=click.IntRange(1, 1000), default=DEFAULT_GRAPH_CACHE, show_default=True,
            help="CUDA graphs kept, one per edit size; the least recently used is evicted (its memory freed) when "
            "a new size needs room."),
        "compile": click.option(
            "--compile/--no-compile", "compile_dit", default=None,
            help="torch.compile each DiT block, the token count dynamic (one compile serves every size; the first "
            "edit pays it) [default: on for --backend torch on CUDA, off elsewhere]. --compile forces it on any "
            "device, CPU included (slow C++ builds)."),
        "compile_mode": click.option(
            "--compile-mode", default=None,
            help="torch.compile mode (e.g. max-autotune-no-cudagraphs) [default: inductor's default]."),
        "shape_buckets": click.option(
            "--shape-buckets", is_flag=True,
            help="Snap each edit to the nearest of a few fixed aspect ratios (fewer shapes: fewer CUDA graphs) and "
            "resize the result back to the input's size. Changes the pixels the model sees vs upstream."),
        "sequential_load": click.option(
            "--sequential-load", type=click.Choice(["disk", "host"]), is_flag=False, flag_value="disk", default=None,
            callback=lambda _ctx, _param, value: {None: False, "disk": True}.get(value, value),
            help="One stage on the device at a time (the MLLM gone before the DiT): for GPUs with <= 24 GB. "
            "--sequential-load (disk) rebuilds each stage from its files for its turn; --sequential-load host reads "
            "each once into pinned host memory and copies it to the device for its turn, the next stage's copy "
            "beside the current one's last work (host RAM: every swapped stage's weights)."),
        "mllm_quant": click.option(
            "--mllm-quant", type=click.Choice(MLLM_QUANT), default=None,
            help="Qwen2.5-VL's Linears as weight-only layers, quantized on the host before they reach the device: "
            "fp8 / int8 per output channel, or int4 (groups of 128 input channels, a bf16 scale and zero each: "
            "torch's W4A16 format; a layer no group divides stays int8) [default: none; the --preset's]."),
        "attention": click.option(
            "--attention", type=click.Choice(ATTENTION), default="auto",
            show_default=True,
            help="The DiT's SDPA kernel (torch backend), fixed around the whole step so it holds inside the "
            "compiled and captured graph: auto = cuDNN first on Hopper and newer GPUs (then flash, "
            "memory-efficient, math), torch's own order elsewhere; the others force one kernel."),
        "exact_batches": click.option(
            "--exact-batches/--plain-batches", default=None,
            help="Batched edits (the server's batches): each edit bit for bit what it is alone (the batch's GEMMs "
            "and activations run one edit at a time), or one plain batched call per DiT step (each edit within "
            "rounding of its edit alone) [default: exact on CPU, plain on CUDA, where kernels differ per batch "
            "size anyway]."),
        "text_bucket": click.option(
            "--text-bucket", type=click.IntRange(0, 4096), default=None,
            help="v1.2: both CFG branches in one DiT call, their texts padded to a multiple of this many tokens and "
            "the padding masked (equal to the per-branch calls up to fp32 rounding; one CUDA graph per bucket); 0: "
            "one call per branch at its own length, as the published pipeline (bit-exact) [default: 64 on CUDA, "
            "for batches and for --cfg-degree 2; 0 elsewhere]. v1.0/v1.1 always run one call."),
        "threads": click.option(
            "--threads", type=click.IntRange(1, 1024), default=None,
            help="CPU threads torch's operators use during an edit [default: 1 for the small models on CPU (their "
            "operators are too small to share, and spinning threads stall on a busy machine), else one per core]."),
        "resident_blocks": click.option(
            "--resident-blocks", type=click.IntRange(0), default=None,
            help="DiT block streaming (torch backend, eager): keep the first N transformer blocks (double, then "
            "single, as they run) on the device and stream the others from pinned host memory, each copied ahead "
            "of its turn on a side stream and freed after it [default: every block resident; the --preset's]."),
        "prefetch_blocks": click.option(
            "--prefetch-blocks", type=click.IntRange(1), default=None,
            help="With --resident-blocks: streamed blocks copied ahead of the one running (device memory for this "
            "many + 1 blocks) [default: the --preset's, else 1]."),
        "preset": click.option(
            "--preset", type=click.Choice(MEMORY_PRESETS), default=None,
            help="A card-size preset (`step1x-export plan --preset P` counts its memory at 1024^2): 24gb (4090, "
            "A5000), 22gb (L4, A10), 16gb, 12gb, 8gb. Sets its MLLM format (8gb: int4), loading, batch (1), CUDA "
            "graphs (off) and, for 16gb / 12gb / 8gb, --resident-blocks and --prefetch-blocks (each unless given); "
            "needs --quant QUANTIZED_CHECKPOINT (8-bit DiT; 8gb: 4-bit blocks, `quantize --int4-layers`). The MLLM "
            "waits in pinned host memory while the DiT runs (--sequential-load host: every stage read from disk "
            "once, copied to the device for its turn). On CUDA, load checks the device's free memory against the "
            "plan."),
    }


SOURCE_KEYS = ("model_dir", "model_name", "backend", "engine_dir", "quant", "version", "loras", "dtype")


def runtime_options(*, source: bool = True, only: tuple[str, ...] | None = None
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the runtime flags to a click command and hand it one `RuntimeArgs` as `runtime`.

    `source=False` leaves out what names the model (for commands that build their own, like `bench`);
    `only` keeps just these execution flags (by `RuntimeArgs` field name).
    """

    names = [name for name in _execution_options() if only is None or name in only]
    keys = (SOURCE_KEYS if source else ()) + tuple("compile_dit" if n == "compile" else n for n in names)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        def command(**kwargs: Any) -> Any:
            flags = {k: kwargs.pop(k) for k in keys}  # only this decorator's own flags
            if "compile_dit" in flags:
                flags["compile"] = flags.pop("compile_dit")
            return fn(runtime=RuntimeArgs(**flags), **kwargs)

        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        command.__click_params__ = list(getattr(fn, "__click_params__", []))  # type: ignore[attr-defined]
        execution = [o for name, o in _execution_options().items() if name in names]
        options = (_source_options() if source else []) + execution
        for option in reversed(options):  # click lists options in decoration order, top first
            command = option(command)
        return command

    return decorate
