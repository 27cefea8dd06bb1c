"""Isotropic 2-D Gaussian mixtures with class labels: the data of the toy2d benchmark (spec C.1).

``p(x0) = sum_k pi_k N(mu_k, s_k^2 I)``. Every component ``k`` belongs to exactly one class
``classes[k]``, so the classes are disjoint subsets of the components; the class-conditional
distribution ``p(x0 | c)`` is the sub-mixture of class ``c`` with weights renormalised to sum to 1.

Mixtures are stored as JSON::

    {
      "name": "ring8",                      # optional
      "description": "...",                 # optional
      "means":   [[x, y], ...],             # K pairs
      "stds":    [s_0, ...],                # K positive isotropic standard deviations
      "weights": [pi_0, ...],               # K positive weights summing to 1 (within 1e-6)
      "classes": [c_0, ...],                # optional, K integers in [0, num_classes); default all 0
      "num_classes": C                      # optional, default max(classes) + 1
    }

Bundled mixtures live in ``mixtures/*.json`` next to this file (:func:`available_mixtures`) and
are loaded by name with :func:`load_mixture`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "MIXTURES_DIR",
    "NULL_CLASS",
    "WEIGHT_SUM_TOLERANCE",
    "GaussianMixture2D",
    "available_mixtures",
    "load_mixture",
]

MIXTURES_DIR = Path(__file__).parent / "mixtures"
WEIGHT_SUM_TOLERANCE = 1e-6
NULL_CLASS = -1
"""Class label meaning "unconditional" (the full mixture) wherever per-sample labels are accepted."""

_JSON_KEYS = ("name", "description", "means", "stds", "weights", "classes", "num_classes")


def _to_tensor(value: Any, what: str, dtype: torch.dtype | None) -> Tensor:
    try:
        tensor = torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"mixture {what} could not be read as numbers ({err}); give a list of numbers") from None
    return tensor.detach().clone().cpu()


@dataclass(frozen=True, eq=False)
class GaussianMixture2D:
    """An isotropic 2-D Gaussian mixture whose components carry class labels.

    Fields (lists, arrays or tensors are accepted; they are stored as float64 / int64 CPU tensors):

    * ``means``: (K, 2) component means ``mu_k``.
    * ``stds``: (K,) isotropic standard deviations ``s_k > 0``.
    * ``weights``: (K,) mixture weights ``pi_k > 0`` with ``sum_k pi_k = 1`` (within 1e-6).
    * ``classes``: (K,) int class of each component, in ``[0, num_classes)``; ``None`` means one class.
    * ``num_classes``: number of classes ``C``; ``None`` means ``max(classes) + 1``.
    * ``name``: a label used in reports.

    Bad input raises ``ValueError`` naming the field, the problem and the fix.
    """

    means: Tensor
    stds: Tensor
    weights: Tensor
    classes: Tensor | None = None
    num_classes: int | None = None
    name: str = "mixture"
    description: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        means = _to_tensor(self.means, "means", torch.float64)
        if means.ndim != 2 or means.shape[1] != 2 or means.shape[0] < 1:
            raise ValueError(
                f"mixture means must have shape (K, 2) with K >= 1 (one [x, y] pair per component); "
                f"got shape {tuple(means.shape)}"
            )
        k = means.shape[0]
        stds = _to_tensor(self.stds, "stds", torch.float64)
        weights = _to_tensor(self.weights, "weights", torch.float64)
        classes = torch.zeros(k, dtype=torch.int64) if self.classes is None else self.classes
        classes = _to_tensor(classes, "classes", None)
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise ValueError(f"mixture classes must be integers (one class index per component); got {classes.tolist()}")
        classes = classes.to(torch.int64)
        for label, tensor in (("stds", stds), ("weights", weights), ("classes", classes)):
            if tuple(tensor.shape) != (k,):
                raise ValueError(
                    f"mixture {label} must have shape ({k},), one entry per component of means; "
                    f"got shape {tuple(tensor.shape)}"
                )
        for label, tensor in (("means", means), ("stds", stds), ("weights", weights)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"mixture {label} contains a non-finite value (nan or inf): {tensor.tolist()}")
        bad = torch.nonzero(stds <= 0).flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"mixture stds[{i}] = {stds[i].item()} must be > 0 (a standard deviation is positive)")
        bad = torch.nonzero(weights <= 0).flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"mixture weights[{i}] = {weights[i].item()} must be > 0; drop components you do not want"
            )
        total = weights.sum().item()
        if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise ValueError(
                f"mixture weights sum to {total!r}, not 1 (tolerance {WEIGHT_SUM_TOLERANCE:g}); "
                f"divide them by their sum"
            )
        num_classes = int(classes.max().item()) + 1 if self.num_classes is None else self.num_classes
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"mixture num_classes must be a positive integer; got {num_classes!r}")
        if classes.min().item() < 0 or classes.max().item() >= num_classes:
            raise ValueError(
                f"mixture classes must lie in [0, num_classes={num_classes}); got {classes.tolist()}"
            )
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "num_classes", num_classes)

    def __repr__(self) -> str:
        return (
            f"GaussianMixture2D(name={self.name!r}, num_components={self.num_components}, "
            f"num_classes={self.num_classes})"
        )

    # ------------------------------------------------------------------ properties

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """Prior mean ``sum_k pi_k mu_k``, shape (2,)."""
        return self.weights @ self.means

    def data_std(self) -> float:
        """Per-coordinate standard deviation of the data, ``sqrt(E||x0 - E x0||^2 / 2)``
        ``= sqrt(sum_k pi_k (2 s_k^2 + ||mu_k - m||^2) / 2)``. The scale of spec C.4's paired-error bound."""
        centred = self.means - self.mean()
        second = (self.weights * (self.dim * self.stds**2 + (centred**2).sum(dim=1))).sum() / self.dim
        return math.sqrt(second.item())

    def class_mask(self, class_label: int) -> Tensor:
        """(K,) bool mask of the components of class ``class_label`` (``NULL_CLASS`` = all components)."""
        self._check_label(class_label)
        if class_label == NULL_CLASS:
            return torch.ones(self.num_components, dtype=torch.bool)
        mask = self.classes == class_label
        if not mask.any():
            raise ValueError(f"class {class_label} of mixture {self.name!r} has no components")
        return mask

    def component_weights(self, class_label: int | None = None) -> Tensor:
        """(K,) weights of ``p(x0 | c)`` over ALL components: zero outside class ``c``, renormalised inside.
        ``None`` or ``NULL_CLASS`` gives the mixture weights. This is the exact mode-weight target at w = 1."""
        if class_label is None or class_label == NULL_CLASS:
            return self.weights.clone()
        masked = self.weights * self.class_mask(class_label)
        return masked / masked.sum()

    def conditional(self, class_label: int) -> "GaussianMixture2D":
        """The sub-mixture ``p(x0 | c)``: components of class ``c``, weights renormalised to sum to 1.
        It keeps ``num_classes`` (its components all carry class ``c``)."""
        mask = self.class_mask(class_label)
        weights = self.weights[mask]
        return GaussianMixture2D(
            means=self.means[mask],
            stds=self.stds[mask],
            weights=weights / weights.sum(),
            classes=self.classes[mask],
            num_classes=self.num_classes,
            name=f"{self.name}|class={class_label}",
            description=self.description,
        )

    def _check_label(self, class_label: int) -> None:
        if not (NULL_CLASS <= int(class_label) < self.num_classes):
            raise ValueError(
                f"class label {class_label} is out of range for mixture {self.name!r}: use 0..{self.num_classes - 1}, "
                f"or {NULL_CLASS} for unconditional"
            )

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        class_labels: Tensor | Sequence[int] | int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """Exact samples ``x0 ~ p(x0)`` (or ``p(x0 | c)`` per sample).

        ``class_labels``: ``None`` (all unconditional), an int (all from that class), or an (n,) int
        tensor where ``NULL_CLASS`` (-1) entries are unconditional. Components are drawn first
        (categorical over the allowed components), then ``x0 = mu_k + s_k * eps``; both draws use
        ``generator``, on ``generator.device`` (CPU when no generator is given).

        Returns ``(x0, labels)``: x0 (n, 2) in ``dtype`` and labels (n,) int64, the class of the
        component each sample came from (equal to ``class_labels`` where that is not -1), so
        unconditional draws double as labelled training data.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer number of samples; got {n!r}")
        device = generator.device if generator is not None else torch.device("cpu")
        labels = self.per_sample_labels(class_labels, n).to(device)
        probs = self._allowed_weights(labels, device)  # (n, K)
        components = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, device=device, dtype=torch.float64)
        means, stds = self.means.to(device), self.stds.to(device)
        x0 = means[components] + stds[components, None] * noise
        return x0.to(dtype), self.classes.to(device)[components]

    def per_sample_labels(self, class_labels: Tensor | Sequence[int] | int | None, n: int) -> Tensor:
        """Per-sample int64 labels (n,), -1 for unconditional, validated."""
        if class_labels is None:
            return torch.full((n,), NULL_CLASS, dtype=torch.int64)
        labels = torch.as_tensor(class_labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers (use {NULL_CLASS} for unconditional); got {labels.dtype}")
        labels = labels.to(torch.int64)
        if labels.ndim == 0:
            labels = labels.expand(n)
        if tuple(labels.shape) != (n,):
            raise ValueError(f"class_labels must be an int or have shape ({n},), one per sample; got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < NULL_CLASS or labels.max() >= self.num_classes):
            raise ValueError(
                f"class_labels must lie in 0..{self.num_classes - 1} (or {NULL_CLASS} for unconditional) for mixture "
                f"{self.name!r}; got values in [{labels.min().item()}, {labels.max().item()}]"
            )
        present = torch.unique(labels[labels >= 0]).tolist()
        for c in present:
            self.class_mask(int(c))  # raises for a class without components
        return labels

    def allowed_mask(self, labels: Tensor) -> Tensor:
        """(n, K) bool: component k may generate sample i (all True for label -1)."""
        classes = self.classes.to(labels.device)
        return (labels[:, None] == NULL_CLASS) | (classes[None, :] == labels[:, None])

    def _allowed_weights(self, labels: Tensor, device: torch.device) -> Tensor:
        return self.weights.to(device)[None, :] * self.allowed_mask(labels)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "means": self.means.tolist(),
            "stds": self.stds.tolist(),
            "weights": self.weights.tolist(),
            "classes": self.classes.tolist(),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "mixture") -> "GaussianMixture2D":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object with keys {list(_JSON_KEYS)}; got {type(data).__name__}")
        unknown = sorted(set(data) - set(_JSON_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; allowed keys are {list(_JSON_KEYS)}")
        missing = [key for key in ("means", "stds", "weights") if key not in data]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing}; a mixture needs means, stds and weights")
        try:
            return cls(
                means=data["means"],
                stds=data["stds"],
                weights=data["weights"],
                classes=data.get("classes"),
                num_classes=data.get("num_classes"),
                name=str(data.get("name", Path(source).stem)),
                description=str(data.get("description", "")),
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "GaussianMixture2D":
        """Read and validate a mixture JSON file (format in the module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mixture file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def to_json(self, path: str | Path) -> Path:
        """Write the mixture as JSON (floats written exactly, so ``from_json`` round-trips bit for bit)."""
        path = Path(path)
        path.write_text(_format_json(self.to_dict()))
        return path


def _format_json(data: dict[str, Any]) -> str:
    """Readable JSON: one key per line, one mean pair per line (``json.dumps`` keeps floats exact)."""
    lines = []
    for key, value in data.items():
        if key == "means":
            rows = ",\n".join("    " + json.dumps(row) for row in value)
            lines.append(f'  "{key}": [\n{rows}\n  ]')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def available_mixtures() -> list[str]:
    """Names of the bundled mixtures (``mixtures/<name>.json``)."""
    return sorted(p.stem for p in MIXTURES_DIR.glob("*.json"))


def load_mixture(name_or_path: str | Path | GaussianMixture2D) -> GaussianMixture2D:
    """A bundled mixture by name (``"ring8"``, ``"grid25"``) or a mixture JSON file by path.
    A ``GaussianMixture2D`` is returned unchanged."""
    if isinstance(name_or_path, GaussianMixture2D):
        return name_or_path
    bundled = MIXTURES_DIR / f"{name_or_path}.json"
    if isinstance(name_or_path, str) and "/" not in name_or_path and bundled.is_file():
        return GaussianMixture2D.from_json(bundled)
    path = Path(name_or_path)
    if path.is_file():
        return GaussianMixture2D.from_json(path)
    raise FileNotFoundError(
        f"unknown mixture {str(name_or_path)!r}: not a bundled mixture ({', '.join(available_mixtures())}) "
        f"and not an existing JSON file"
    )
