"""The web API's JSON shapes: pydantic models only, so /openapi.json documents every body the API sends.

How a Prediction or a model's metadata becomes one of these is cxr.web.render's job.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every refusal: a stable code for programs and a message that says what to do."""

    error: str = Field(examples=["not_an_image"])
    message: str = Field(examples=["the uploaded file: not an image (looks like a PDF document); send a chest X-ray"])
    gate_score: float | None = Field(None, description="The not-a-chest-X-ray gate's score, on a gate refusal.")


class FindingOut(BaseModel):
    name: str = Field(description="NIH spelling, e.g. Pleural_Thickening")
    display_name: str
    probability: float = Field(ge=0, le=1, description="Independent per finding: they do not sum to 1.")
    threshold: float = Field(ge=0, le=1, description="Operating point chosen on validation data.")
    positive: bool = Field(description="probability >= threshold")


class ImageOut(BaseModel):
    width: int
    height: int
    preview: str | None = Field(None, description="With ?preview=true: the film as read (EXIF-rotated, "
                                "DICOM-windowed), PNG data URL, <= 512 px.")


class ModelSummary(BaseModel):
    name: str
    arch: str
    task: str
    input_size: int


class FindingCard(BaseModel):
    name: str
    display_name: str
    threshold: float
    validation_auc: float | None


class ModelCard(ModelSummary):
    """GET /api/v1/model: what the model is, what it was trained and checked on, and what it is for."""

    data: str
    validation: str | None = Field(None, description="Where the AUCs come from (subset, number of films).")
    macro_auc: float | None
    findings: list[FindingCard]
    gate: bool = Field(description="Whether this model refuses images that are not frontal chest X-rays.")
    intended_use: str
    limitations: str
    clinical_use: bool = False


class PredictOut(BaseModel):
    findings: list[FindingOut] = Field(description="In the model's output order (the paper's).")
    model: ModelSummary
    image: ImageOut
    gate_score: float | None = None
    heatmaps: dict[str, str] | None = Field(
        None, description="With ?heatmaps=all or a comma list: finding -> PNG data URL (RGBA: colour and "
        "opacity from the heat; <= 256 px, the film's aspect: stretch it over the preview)."
    )


class Health(BaseModel):
    status: str = "ok"
    model: str
