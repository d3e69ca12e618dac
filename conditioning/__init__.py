"""What a model is conditioned on, and its null: one concept for class labels and text contexts.

A condition `y` is a tensor with the batch first: class labels (N,) int64 for DiT/SiT, or text contexts
(N, L, D) float — the text encoder's token embeddings of one caption per sample — for MMDiT. Each kind
has a null, the condition of "no condition": the extra class index `num_classes` (the DiT release's
null row of the label table), or the context of the empty caption (U-ViT's and REPA's COCO protocol).
The null replaces the condition of a random share of the training samples (classifier-free guidance
dropout, SPEC §1) and is the unconditional half of guided sampling (SPEC §5). Everything that drops,
guides or draws conditions goes through this one object; nothing else asks which kind it holds.
"""
import dataclasses

import torch

CLASS = "class"  # y: (N,) int64 class indices
TEXT = "text"  # y: (N, L, D) float token contexts of a text encoder
KINDS = (CLASS, TEXT)


@dataclasses.dataclass(frozen=True)
class Condition:
    """One kind of condition and its null for a single sample: a 0-d int64 tensor holding the null class
    index, or the (L, D) float32 context of the empty caption."""

    kind: str
    null: torch.Tensor

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"condition kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def classes(cls, num_classes: int) -> "Condition":
        """Class labels 0..num_classes-1; the null is the extra index num_classes."""
        return cls(CLASS, torch.tensor(num_classes, dtype=torch.long))

    @classmethod
    def text(cls, null_context: torch.Tensor) -> "Condition":
        """Text contexts (N, L, D); the null is the empty caption's (L, D) context."""
        if null_context.ndim != 2:
            raise ValueError(f"the null context must be (L, D), got shape {tuple(null_context.shape)}")
        return cls(TEXT, null_context.float())

    @property
    def num_classes(self) -> int | None:
        return int(self.null) if self.kind == CLASS else None

    def to(self, device) -> "Condition":
        """This condition with its null on `device`, moved once rather than at every step."""
        return dataclasses.replace(self, null=self.null.to(device))

    def model_options(self, dropout_prob: float) -> dict:
        """What the backbone is built with to take this condition (models.create_model): the number of
        classes and, with dropout, the null row of the label table; or the width of the contexts."""
        if self.kind == CLASS:
            return {"num_classes": self.num_classes, "class_dropout_prob": dropout_prob}
        return {"num_classes": 0, "context_dim": self.null.shape[-1]}

    def null_like(self, y: torch.Tensor) -> torch.Tensor:
        """The null condition for every sample of the batch `y`: same shape, dtype and device."""
        return self.null.to(device=y.device, dtype=y.dtype).expand(y.shape)

    def drop(self, y: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each sample's condition by the null with probability `prob` (CFG training). One uniform
        draw per sample, so class labels are dropped exactly as `drop_labels` always did."""
        if prob <= 0:
            return y
        drop = torch.rand(y.shape[:1], device=y.device, generator=generator) < prob
        return torch.where(drop.view(-1, *[1] * (y.ndim - 1)), self.null_like(y), y)

    def describe(self) -> dict:
        """What a record of the run holds about it (the null context itself is data, recorded by content
        with the dataset)."""
        if self.kind == CLASS:
            return {"kind": CLASS, "num_classes": self.num_classes}
        return {"kind": TEXT, "context_shape": list(self.null.shape)}


def of_dataset(dataset) -> Condition:
    """The condition of a preprocessed dataset (preprocessing.dataset.LatentDataset): its classes, or, for
    captioned data, the stored context of the empty caption."""
    if dataset.condition == TEXT:
        return Condition.text(dataset.null_context())
    return Condition.classes(dataset.meta["num_classes"])


def to_model_input(y: torch.Tensor, device) -> torch.Tensor:
    """A loader's conditions as the model takes them, on `device`: labels as they are, contexts (stored in
    half precision) in float32."""
    y = y.to(device, non_blocking=True)
    return y.float() if y.is_floating_point() else y


def as_condition(value) -> Condition:
    """A Condition as given, or the class condition of a null class index (the older `null_class`)."""
    return value if isinstance(value, Condition) else Condition.classes(int(value))
