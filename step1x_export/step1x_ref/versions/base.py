"""The interface a model version implements: what differs between releases, behind one small object chosen
from the config (`versions.edit_version`). The edit flow, the reference pipeline and the runtime call it and
never ask which version they run; adding a release is one module here plus its config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

    from ..configs import ModelConfig
    from ..edit_inputs import EditImage
    from ..mllm.conditioner import Qwen25VLEmbedder
    from ..sampling import StepFn


@runtime_checkable
class EditVersion(Protocol):
    """One release's rules for an edit. Capabilities are plain flags; the rest are the steps that differ."""

    config: ModelConfig
    text_to_image: bool  # an edit without an input image generates one from the text
    shape_buckets: bool  # its edits may snap to the fixed aspect buckets
    trimmed_text: bool  # the text length varies per edit (padding trimmed): a dynamic text axis in the DiT
    dit_inputs: tuple[str, ...]  # the names of `conditioning`'s tensors: the dit spec's inputs it feeds
    mllm_graphs: bool  # its MLLM may run from the exported vision and llm graphs
    reasoning: bool  # the MLLM may think before the edit and judge it after (v1.2's reasoning edit)
    # Why the two CFG branches cannot share one DiT call ("" where they do): batched edits stack that call.
    per_branch_dit: str

    def joint(self, text_bucket: int) -> EditVersion:
        """This version with both CFG branches in one DiT call, texts padded to a multiple of `text_bucket`
        tokens (itself where the branches always share one call)."""
        ...

    def stack(self, rows: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """Several edits' `conditioning` as one batch (lane i at rows 2i, 2i + 1 of each per-branch tensor)."""
        ...

    def embedder(self, embedder: Qwen25VLEmbedder) -> Qwen25VLEmbedder:
        """The conditioner this version reads, over `embedder`'s Qwen model."""
        ...

    def prepare(self, image: Image.Image | None, size_level: int, *, width: int | None = None,
                height: int | None = None, bucket: tuple[int, int] | None = None) -> EditImage:
        """The edit's image as the VAE and the MLLM receive it (None: text-to-image at width x height, or
        InputError where the version has none); `bucket` (width, height) replaces the size_level rule."""
        ...

    def check_encoded(self, encoded: Any) -> None:
        """Raise NonFiniteError if the MLLM's output for the edit is not finite."""
        ...

    def conditioning(self, encoded: Any, img: EditImage) -> tuple[Tensor, ...]:
        """The DiT's inputs besides img and timestep, in the dit spec's order, as `step` takes them."""
        ...

    def step(self, step_fn: StepFn) -> StepFn:
        """The loop's step over `conditioning` from a DiT step function over the dit spec's inputs."""
        ...

    def postprocess(self, pixels: Tensor, orig_size: tuple[int, int]) -> Image.Image:
        """Decoded pixels [1, 3, H, W] -> the output image at the input's size."""
        ...
