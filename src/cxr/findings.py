"""The 14 ChestX-ray14 findings and the input normalisations: defined here once, used everywhere."""

from __future__ import annotations

# The paper's order (and NIH's spellings). Index i of every model output is FINDINGS[i].
FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

DISPLAY_NAMES: dict[str, str] = {f: f.replace("_", " ").capitalize() for f in FINDINGS}

NO_FINDING = "No Finding"

# Inputs are normalised per channel with one of these; the checkpoint records which mean/std it was
# trained with, so inference always uses the training statistics rather than a guess.
NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # torchvision ImageNet weights (DenseNet-121)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # EfficientNet-Lite (TF-lite lineage) scales inputs to [-1, 1]: mean 0.5, std 0.5
    "lite": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


_LOOKUP = {_key(f): f for f in FINDINGS}
_LOOKUP["oedema"] = "Edema"  # the paper's British spelling


def canonical(name: str) -> str:
    """NIH spelling for a finding given any common spelling ('pleural thickening', 'Pleural_Thickening')."""
    try:
        return _LOOKUP[_key(name)]
    except KeyError:
        raise ValueError(
            f"unknown finding {name!r}; expected one of: {', '.join(FINDINGS)}"
        ) from None


def index(name: str) -> int:
    """Position of a finding in FINDINGS (and in every model output)."""
    return FINDINGS.index(canonical(name))
