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
    positive: bool = Field(description="assessed and probability >= threshold")
    assessed: bool = Field(True, description="False: the model has no evidence it does better than chance on this "
                           "finding; its probability is returned for research use only and it is never positive.")
    reason: str | None = Field(None, description="Why the finding is not assessed (absent when it is).")


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
    members: int = Field(1, description="Networks of `arch` whose logits are averaged: more than 1 for an "
                         "ensemble (the cross-validation's fold models).")


class FindingCard(BaseModel):
    name: str
    display_name: str
    threshold: float
    validation_auc: float | None
    validation_auc_ci: list[float] | None = None
    assessed: bool = True
    reason: str | None = Field(None, description="Why the finding is not assessed (absent when it is).")


class ModelCard(ModelSummary):
    """GET /api/v1/model: what the model is, what it was trained and checked on, and what it is for."""

    data: str
    validation: str | None = Field(None, description="Where the AUCs come from (subset, number of films).")
    macro_auc: float | None
    operating_point: str | None = Field(None, description="How the thresholds were chosen, e.g. 'spec:0.90' "
                                        "(specificity at least 0.90 per finding) and on which films.")
    calibrated: bool = Field(False, description="Whether probabilities are recalibrated (Platt, per finding).")
    findings: list[FindingCard]
    gate: bool = Field(description="Whether this model refuses images that are not frontal chest X-rays.")
    intended_use: str
    limitations: str
    clinical_use: bool = False


class CaptureOut(BaseModel):
    """What was done to the image before it was read (a photo's film found and cropped, a turn undone)."""

    crop: list[list[float]] | None = Field(None, description="The film's 4 corners [x, y], clockwise from "
                                           "top-left, in the image as sent (after EXIF rotation); absent: the whole image.")
    crop_source: str = Field(description="found (a film on a light box in a photo), given (?crop=) or none")
    rotated_degrees: int = Field(description="The film was turned this many degrees anticlockwise; it was "
                                 "turned back before reading.")
    inverted: bool = Field(description="The film was a negative; it was made positive before reading.")
    orientation_confidence: float = Field(ge=0, le=1)
    message: str = Field(description="What was done, in words ('' when nothing).")
    photo: str | None = Field(None, description="With ?preview=true and a crop: the image as sent, PNG data "
                              "URL, <= 512 px, for drawing and adjusting the crop.")


class StabilityOut(BaseModel):
    """How far the probabilities move under small test-time changes (a 4 degree tilt, JPEG 70, exposure)."""

    spread: float = Field(ge=0, le=1, description="Largest |change| of any finding's probability.")
    per_variant: dict[str, float]
    limit: float
    unstable: bool = Field(description="spread > limit: the answer depends on how the film was photographed.")


class PredictOut(BaseModel):
    findings: list[FindingOut] = Field(description="In the model's output order (the paper's).")
    model: ModelSummary
    image: ImageOut
    capture: CaptureOut | None = None
    stability: StabilityOut | None = Field(None, description="With ?stability=true.")
    gate_score: float | None = None
    heatmaps: dict[str, str] | None = Field(
        None, description="With ?heatmaps=all or a comma list: finding -> PNG data URL (RGBA: colour and "
        "opacity from the heat; <= 256 px, the film's aspect: stretch it over the preview)."
    )


class Health(BaseModel):
    status: str = "ok"
    model: str
