"""Films photographed on a light box (issue 14): finding the film, pass-through of real films, orientation
and polarity on held-out patients, and seeded capture augmentations. All on the shared real films."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr import images
from cxr.data import capture as aug
from cxr.images import capture
from cxr.images.capture import Quad, quad_iou


def _films(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def _held_out(path: Path) -> bool:
    with np.load(Path(capture.__file__).parents[1] / "assets" / "orientation.npz") as z:
        every = int(z["holdout_every"])
    return int(path.name[:8]) % every == 0


# --- geometry helpers ------------------------------------------------------------------------------------

def test_quad_iou_is_exact_on_simple_shapes():
    a = Quad.frame(10, 10)
    assert quad_iou(a, a) == pytest.approx(1.0)
    assert quad_iou(a, Quad.from_array([(5, 0), (15, 0), (15, 10), (5, 10)])) == pytest.approx(50 / 150)
    assert quad_iou(a, Quad.from_array([(20, 20), (30, 20), (30, 30), (20, 30)])) == 0.0
    # any corner order means the same quadrilateral
    assert Quad.from_array([(10, 10), (0, 0), (0, 10), (10, 0)]) == a


def test_shrinking_only_the_films_box_changes_no_bit(images_512, monkeypatch):
    """A big photo's film is rectified from a shrink of the quad's box alone (pipeline._rectified): that
    part is the whole photo's shrink bit for bit (blocks aligned to the factor; partial blocks at the frame's
    edge), and the film read is the same, for a quad inside the frame, one on its edge and one partly off
    it (rectify then fills with the whole shrink's level, so the whole photo is shrunk)."""
    from cxr.images import geometry
    from cxr.inference import pipeline

    gray = images.read_image(_films(images_512)[4])
    photo, truth = aug.light_box_photo(gray, np.random.default_rng(21), size=(1201, 1603))  # blocks left over
    seen = images.read_image(aug.photo_bytes(photo))
    h, w = seen.shape
    for f in (2, 3, 5):
        whole = geometry.shrunk(seen, f)
        sh, sw = whole.shape
        for x0, y0, x1, y1 in [(0, 0, sw, sh), (7, 3, 50, 41), (sw - 9, sh - 4, sw, sh), (1, 1, sw - 1, sh - 1)]:
            part = geometry.shrunk(seen, f, (x0, y0, x1, y1))
            assert part.shape == whole.shape and np.array_equal(part[y0:y1, x0:x1], whole[y0:y1, x0:x1]), (f, x0, y0)

    boxes = []
    monkeypatch.setattr(capture, "shrunk", lambda g, f, box=None: boxes.append(box) or geometry.shrunk(g, f, box))
    t = truth.array()
    quads = {"inside": truth, "on the edge": Quad.from_array([(0, 0), (w, 0), t[2], t[3]]),
             "partly off": Quad.from_array(t - [0.3 * w, 0])}
    for name, quad in quads.items():
        for side in (64, 160):
            boxes.clear()
            got = pipeline._rectified(seen, quad, side)
            size = pipeline._read_size(quad, side)
            f = int(max(pipeline._sides(quad)) / (2 * max(size)))
            assert f >= 2 and (boxes[0] is None) == (name == "partly off"), (name, side, boxes)
            want = capture.rectify(geometry.shrunk(seen, f), quad.scaled(1 / f, 1 / f), size=size)
            assert np.array_equal(got, want), (name, side)


def test_rectify_of_the_full_frame_is_the_film(images_512):
    gray = images.read_image(_films(images_512)[0])
    h, w = gray.shape
    out = capture.rectify(gray, Quad.frame(w, h), inset=0.0, stretch=False)
    assert out.shape == gray.shape
    assert np.abs(out - gray)[2:-2, 2:-2].max() < 1e-4


# --- the film finder ---------------------------------------------------------------------------------------

def _photo_ious(paths: list[Path], seed: int, rgb: bool = False) -> list[float]:
    ious = []
    for i, path in enumerate(paths):
        photo, truth = aug.light_box_photo(images.read_image(path), np.random.default_rng(seed + i))
        # what the finder sees: the phone's JPEG decoded to gray by read_image (or the colour array itself)
        seen = photo if rgb else images.read_image(aug.photo_bytes(photo))
        found = capture.find_film(seen)
        ious.append(0.0 if found is None else quad_iou(found, truth))
    return ious


def test_finder_locates_films_in_light_box_photos(images_512, images_1024):
    paths = _films(images_512)[::23] + _films(images_1024)[:4]
    ious = _photo_ious(paths, seed=100)
    assert min(ious) >= 0.9, f"IoU per photo: {np.round(ious, 3).tolist()}"


def test_finder_reads_colour_photos_too(images_512):
    ious = _photo_ious(_films(images_512)[5:11], seed=200, rgb=True)
    assert min(ious) >= 0.9, f"IoU per photo: {np.round(ious, 3).tolist()}"


@pytest.mark.parametrize("folder", ["images_512", "images_1024", "images_64"])
def test_films_that_are_already_films_pass_through(folder, request):
    """Zero false crops: every shared film (edge to edge PNGs, gray, RGB or RGBA) is left as it is."""
    paths = _films(request.getfixturevalue(folder))
    cropped = [(p.name, q) for p in paths if (q := capture.find_film(images.read_image(p))) is not None]
    assert not cropped, f"{len(cropped)} of {len(paths)} films were cropped: {cropped[:5]}"


def test_finder_ignores_pictures_without_a_light_box():
    rng = np.random.default_rng(0)
    assert capture.find_film(np.zeros((300, 400), np.float32)) is None
    assert capture.find_film(np.ones((300, 400), np.float32)) is None
    assert capture.find_film(rng.random((300, 400)).astype(np.float32)) is None


def test_rectified_photo_looks_like_the_film(images_512):
    gray = images.read_image(_films(images_512)[3])
    photo, _ = aug.light_box_photo(gray, np.random.default_rng(7), glare_p=0.0)
    seen = images.read_image(aug.photo_bytes(photo))
    out = capture.rectify(seen, capture.find_film(seen), size=(128, 128))
    ref = images.resize(gray, 128)[3:-3, 3:-3]
    assert np.corrcoef(out[3:-3, 3:-3].ravel(), ref.ravel())[0, 1] > 0.9


# --- orientation and polarity --------------------------------------------------------------------------------

def _turned(gray: np.ndarray):
    for k in range(4):
        for inverted in (False, True):
            x = np.rot90(gray, k)
            yield k, inverted, np.ascontiguousarray(1.0 - x if inverted else x)


def test_orientation_and_polarity_on_held_out_patients(images_512, images_64):
    """Fitted on other patients (scripts/fit_orientation.py); >= 98% of turned or inverted films right,
    and the confident answers (>= 0.7, where a caller would act instead of refusing) essentially all right."""
    paths = [p for folder in (images_512, images_64) for p in _films(folder) if _held_out(p)]
    assert len(paths) >= 200
    right, confident, confident_wrong = 0, 0, 0
    for path in paths:
        for k, inverted, x in _turned(images.read_image(path)):
            o = capture.orientation(x)
            ok = (o.k_rot90, o.inverted) == (k, inverted)
            right += ok
            confident += o.confidence >= 0.7
            confident_wrong += (o.confidence >= 0.7) and not ok
    n = 8 * len(paths)
    assert right / n >= 0.98, f"{right}/{n} right"
    assert confident / n >= 0.95 and confident_wrong / n <= 0.005, (confident, confident_wrong, n)


def test_turned_photo_is_found_rectified_and_put_upright(images_512):
    paths = [p for p in _films(images_512) if _held_out(p)][:6]
    for i, path in enumerate(paths):
        k, inverted = i % 4, i % 3 == 0
        gray = np.rot90(images.read_image(path), k)
        gray = np.ascontiguousarray(1.0 - gray if inverted else gray)
        photo, _ = aug.light_box_photo(gray, np.random.default_rng(300 + i))
        seen = images.read_image(aug.photo_bytes(photo))
        film = capture.rectify(seen, capture.find_film(seen))
        o = capture.orientation(film)
        assert (o.k_rot90, o.inverted) == (k, inverted), (path.name, o)
        assert capture.correct(film, o.k_rot90, o.inverted).shape[0] >= film.shape[1] * 0.8


def test_correct_undoes_the_turn_and_describe_says_what_was_done():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 11
    assert np.allclose(capture.correct(1 - np.rot90(x, 3), 3, True), x, atol=1e-6)
    assert capture.describe(capture.Orientation(2, False, 0.9)) == "this film was upside down"
    assert capture.describe(capture.Orientation(0, False, 0.9)) == ""
    assert "negative" in capture.describe(capture.Orientation(1, True, 0.9))


# --- capture augmentations ------------------------------------------------------------------------------------

def test_augmentations_are_seeded_and_keep_the_shape(images_512):
    gray = images.resize(images.read_image(_films(images_512)[1]), 256)
    t = aug.CaptureAugment(p=1.0)
    a, b = t(gray, np.random.default_rng(3)), t(gray, np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, t(gray, np.random.default_rng(4)))
    assert a.shape == gray.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(aug.CaptureAugment(0.5, seed=9)(gray), aug.CaptureAugment(0.5, seed=9)(gray))
    for name, step in aug.STEPS.items():
        x, y = step(gray, np.random.default_rng(1)), step(gray, np.random.default_rng(1))
        assert np.array_equal(x, y) and x.shape == gray.shape, name
    p1, q1 = aug.light_box_photo(gray, np.random.default_rng(5), size=(300, 400))
    p2, q2 = aug.light_box_photo(gray, np.random.default_rng(5), size=(300, 400))
    assert np.array_equal(p1, p2) and q1 == q2 and p1.shape == (400, 300, 3)


def test_variants_name_every_perturbation_the_targets_name(images_512):
    gray = images.resize(images.read_image(_films(images_512)[2]), 256)
    v = aug.variants(gray, np.random.default_rng(0))
    assert set(v) == {"jpeg", "tilt", "glare", "crop", "exposure", "light_box"}
    assert all(x.ndim == 2 and x.dtype == np.float32 for x in v.values())


# --- through the Predictor: the one inference path --------------------------------------------------------

@pytest.fixture(scope="module")
def predictor():
    from cxr.inference.predictor import Predictor

    return Predictor(backend="torch")


def _direct(predictor, gray: np.ndarray) -> np.ndarray:
    """The bundled model on a film preprocessed as it was before the capture stage existed."""
    from cxr.inference import pipeline
    from cxr.tasks import probabilities

    logits, _ = predictor._run(pipeline.preprocess(gray, predictor.meta)[None])
    return probabilities(logits, predictor.meta)[0]


def test_films_pass_through_the_predictor_unchanged(predictor, images_512, images_1024, images_64):
    """Files that are films already: nothing cropped or turned, and the same numbers bit for bit."""
    paths = _films(images_512)[::40] + _films(images_1024)[:3] + _films(images_64)[::100]
    for path in paths:
        pred = predictor.predict_one(path)
        if pred.capture.refused:  # unsure orientation (0.8% of upright films): refused, never altered
            continue
        assert pred.capture.crop is None and not pred.capture.changed and pred.capture.message == "", path.name
        got = predictor.probabilities_of([images.read_image(path)])[0]
        assert np.array_equal(got, _direct(predictor, images.read_image(path))), path.name


def test_turned_films_are_corrected_or_refused_never_read_as_they_are(predictor, images_512):
    """Every turn and inversion of held-out films: corrected (then |dp| <= 0.05 against the upright film,
    and the message says what was done) or refused with the reason."""
    paths = [p for p in _films(images_512) if _held_out(p)][:12]
    for path in paths:
        film = images.read_film(path)
        upright = predictor.predict_film(film)
        for k, inverted, x in list(_turned(film.gray))[1:]:
            pred = predictor.predict_film(images.Film(x, (x.shape[1], x.shape[0]), None, path.name))
            c = pred.capture
            if c.refused:
                assert pred.refused == c.message and "which way up" in c.message
                continue
            assert (c.k_rot90, c.inverted) == (k, inverted), (path.name, k, inverted, c)
            assert c.message.endswith("before reading") and c.message.startswith("this film was")
            if pred.probabilities and upright.probabilities:
                dp = max(abs(pred.probabilities[f] - upright.probabilities[f]) for f in upright.probabilities)
                assert dp <= 0.05, (path.name, k, inverted, dp)
    c = predictor.predict_film(images.Film(np.ascontiguousarray(np.rot90(film.gray, 2)), film.size, None, "x")).capture
    assert c.message == "this film was upside down; it was turned before reading" or c.refused


def test_photo_is_cropped_in_the_predictor_and_the_crop_is_reported(predictor, images_512):
    gray = images.read_image(_films(images_512)[9])
    photo, truth = aug.light_box_photo(gray, np.random.default_rng(11))
    pred = predictor.predict_one(aug.photo_bytes(photo))
    c = pred.capture
    assert c.crop_source == "found" and quad_iou(Quad(c.crop), truth) >= 0.9
    assert "cropped" in c.message and c.to_dict()["crop"] == [list(p) for p in c.crop]


def test_a_given_crop_is_used_and_checked(predictor, images_512):
    from cxr.inference import pipeline

    film = images.read_film(_films(images_512)[9])
    quad = pipeline.crop_quad([30, 20, 490, 25, 480, 500, 25, 495], *film.size)
    pred = predictor.predict_film(film, crop=quad, keep_read=True)
    assert pred.capture.crop_source == "given" and pred.read.shape[0] <= 2 * predictor.meta.input_size
    whole = predictor.predict_film(film, crop="full")
    assert whole.capture.crop is None and whole.probabilities == predictor.predict_film(film).probabilities
    for bad in ([1, 2, 3], [0, 0, 9e9, 0, 9e9, 9e9, 0, 9e9], [0, 0, 10, 0, 10, 10, 0, 10],
                [0, 0, 512, 0, float("nan"), 512, 0, 512]):
        with pytest.raises(pipeline.CropError, match="crop"):
            pipeline.crop_quad(bad, *film.size)


def test_probabilities_of_scores_what_predict_reads(predictor, images_512):
    """`cxr evaluate` goes through probabilities_of: a confidently turned film is turned back there too."""
    path = [p for p in _films(images_512) if _held_out(p)][1]
    gray = images.read_image(path)
    turned = np.ascontiguousarray(1.0 - np.rot90(gray, 3))
    a, b = predictor.probabilities_of([gray, turned])
    pred = predictor.predict_film(images.Film(turned, turned.shape[::-1], None, "t"))
    if not pred.capture.refused:
        assert np.allclose(a, b, atol=1e-6)
