"""cxr.data.nih: reading ChestX-ray14's metadata, lists and boxes; tasks, splits and statistics.

The real-data tests reproduce the paper's numbers (Elkins et al. 2020, Figure 3 and Eq. 1); the synthetic
ones check that every malformed input is a DataError naming the file and the problem.
"""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest

from cxr.data import nih, splits
from cxr.errors import CxrError, DataError
from cxr.findings import FINDINGS

# The paper's Figure 3, rows and columns alphabetical as printed there ('Hemia' in the text is Hernia).
FIGURE_3_ORDER = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                  "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
FIGURE_3 = [
    [11559, 370, 1223, 221, 3275, 424, 220, 40, 3264, 739, 590, 496, 262, 774],
    [370, 2776, 169, 127, 1063, 44, 52, 7, 587, 102, 108, 111, 41, 49],
    [1223, 169, 4667, 162, 1287, 103, 79, 4, 1221, 610, 428, 251, 123, 223],
    [221, 127, 162, 2303, 593, 30, 9, 3, 981, 129, 131, 64, 340, 33],
    [3275, 1063, 1287, 593, 13317, 359, 188, 21, 4000, 1254, 912, 849, 269, 996],
    [424, 44, 103, 30, 359, 2516, 36, 4, 449, 215, 115, 151, 23, 747],
    [220, 52, 79, 9, 188, 36, 1686, 8, 345, 117, 166, 176, 11, 80],
    [40, 7, 4, 3, 21, 4, 8, 227, 33, 25, 10, 8, 3, 9],
    [3264, 587, 1221, 981, 4000, 449, 345, 33, 19894, 1159, 1546, 750, 605, 946],
    [739, 102, 610, 129, 1254, 215, 117, 25, 1159, 5782, 906, 452, 71, 431],
    [590, 108, 428, 131, 912, 115, 166, 10, 1546, 906, 6331, 411, 70, 341],
    [496, 111, 251, 64, 849, 151, 176, 8, 750, 452, 411, 3385, 48, 289],
    [262, 41, 123, 340, 269, 23, 11, 3, 605, 71, 70, 48, 1431, 41],
    [774, 49, 223, 33, 996, 747, 80, 9, 946, 431, 341, 289, 41, 5302],
]

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143",
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171",
    "00000003_000.png,Hernia,0,3,74,F,AP,2048,2500,0.168,0.168",
    "00000004_000.png,Pneumothorax|Mass,0,4,82,M,AP,2048,2500,0.168,0.168",
    "00000005_000.png,Pneumothorax,0,5,69,F,PA,2048,2500,0.168,0.168",
]


def write(path, lines, *, gz=False):
    text = "\n".join(lines) + "\n"
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="session")
def metadata(metadata_csv):
    return nih.read_metadata(metadata_csv)


@pytest.fixture(scope="session")
def official(metadata, nih_dir):
    return nih.read_official_lists(nih_dir, known=metadata["image"])


@pytest.fixture
def small_csv(tmp_path):
    return write(tmp_path / "Data_Entry_2017.csv", [HEADER, *ROWS])


# --- the real metadata: the paper's numbers -----------------------------------------------------------


def test_real_metadata_counts_and_columns(metadata):
    assert len(metadata) == 112_120
    assert metadata["patient"].nunique() == 30_805
    assert int(nih.label_matrix(metadata).any(axis=1).sum()) == 51_759
    assert list(metadata.columns) == ["image", "labels", "patient", "follow_up", "age", "sex", "view",
                                      "width", "height", "spacing_x", "spacing_y"]
    first = metadata.iloc[0]
    assert (first["image"], first["labels"]) == ("00000001_000.png", "Cardiomegaly")
    assert (first["patient"], first["follow_up"], first["age"]) == (1, 0, 57)
    assert (first["sex"], first["view"], first["width"], first["height"]) == ("M", "PA", 2682, 2749)
    assert first["spacing_x"] == pytest.approx(0.143)
    assert metadata["age"].between(0, 120).all()  # v2020 fixed the 2017 release's ages of 148 to 414


def test_real_cooccurrence_is_the_papers_figure_3(metadata):
    y = nih.select_task(metadata, "multilabel").targets
    matrix = nih.cooccurrence(y)
    order = [FINDINGS.index(f) for f in FIGURE_3_ORDER]
    assert matrix[np.ix_(order, order)].tolist() == FIGURE_3
    assert [nih.label_counts(y)[f] for f in FIGURE_3_ORDER] == [FIGURE_3[i][i] for i in range(14)]


def test_real_tasks(metadata):
    full = nih.select_task(metadata, "multilabel")
    assert full.targets.shape == (112_120, 14) and full.targets.dtype == np.uint8
    assert (full.targets.sum(axis=1) == 0).sum() == (metadata["labels"] == "No Finding").sum() == 60_361
    paper = nih.select_task(metadata, "multilabel-paper")
    assert paper.targets.shape == (51_759, 14) and paper.targets.any(axis=1).all()
    ptx = nih.select_task(metadata, "pneumothorax")
    assert ptx.class_names == ("All others", "Pneumothorax") and not ptx.multilabel
    assert np.bincount(ptx.targets).tolist() == [46_457, 5_302]
    assert list(ptx.df["image"]) == list(paper.df["image"])


def test_real_class_weights_are_eq_1(metadata):
    ptx = nih.select_task(metadata, "pneumothorax")
    weights = splits.class_weights(ptx)
    assert weights["All others"] == pytest.approx(51_759 / (2 * 46_457))
    assert weights["Pneumothorax"] == pytest.approx(51_759 / (2 * 5_302))
    assert (round(weights["All others"], 4), round(weights["Pneumothorax"], 4)) == (0.5571, 4.8811)
    paper = nih.select_task(metadata, "multilabel-paper")
    per_finding = splits.class_weights(paper)
    assert per_finding["Hernia"] == pytest.approx([51_759 / (2 * (51_759 - 227)), 51_759 / (2 * 227)])
    pw = splits.pos_weight(paper.targets)
    assert pw[FINDINGS.index("Hernia")] == pytest.approx((51_759 - 227) / 227)
    assert pw[FINDINGS.index("Pneumothorax")] == pytest.approx(46_457 / 5_302)


def test_real_random_split_is_the_papers_and_warns_of_its_leak(metadata):
    ptx = nih.select_task(metadata, "pneumothorax")
    with pytest.warns(splits.PatientLeakWarning, match=r"puts \d+ patients in both train and validation") as caught:
        split = splits.make_split(ptx.df, "random", seed=42)
    assert split.sizes() == {"train": 41_408, "val": 10_351, "test": 0}  # the paper's sizes
    leaked = split.patient_overlap["train-val"]
    assert leaked > 1000 and str(leaked) in str(caught[0].message)
    assert split.patient_overlap["train-test"] == split.patient_overlap["val-test"] == 0


def test_real_patient_split_shares_no_patient(metadata):
    ptx = nih.select_task(metadata, "pneumothorax")
    split = splits.make_split(ptx.df, "patient", seed=42)
    assert split.patient_overlap == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert sorted(split.train + split.val + split.test) == sorted(ptx.df["image"])
    for part, share in (("val", 0.1), ("test", 0.1)):
        assert abs(split.sizes()[part] - share * 51_759) < 100  # whole patients, so close to the fraction
    again, other = splits.make_split(ptx.df, "patient", seed=42), splits.make_split(ptx.df, "patient", seed=7)
    assert again.val == split.val and other.val != split.val


def test_real_official_split_intersects_the_lists_with_the_task(metadata, official):
    assert (len(official.train_val), len(official.test)) == (86_524, 25_596)
    full = splits.make_split(metadata, "official", lists=official)
    assert set(full.test) == set(official.test) and set(full.train + full.val) == set(official.train_val)
    assert full.patient_overlap == {"train-val": 0, "train-test": 0, "val-test": 0}
    ptx = nih.select_task(metadata, "pneumothorax")
    sub = splits.make_split(ptx.df, "official", lists=official, val=0.2)
    assert set(sub.test) == set(official.test) & set(ptx.df["image"])
    assert sum(sub.sizes().values()) == 51_759
    assert sub.patient_overlap == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert abs(len(sub.val) - 0.2 * (len(sub.train) + len(sub.val))) < 100


def test_real_boxes(nih_dir, metadata):
    boxes = nih.read_boxes(nih_dir / "BBox_List_2017.csv", known=metadata["image"])
    assert list(boxes.columns) == ["image", "finding", "x", "y", "w", "h"]
    assert len(boxes) == 984 and boxes["image"].nunique() == 880
    assert (boxes["finding"] == "Infiltration").sum() == 123 and "Infiltrate" not in set(boxes["finding"])
    assert set(boxes["finding"]) <= set(FINDINGS)
    assert ((boxes["x"] + boxes["w"]) <= 1024).all() and ((boxes["y"] + boxes["h"]) <= 1024).all()


# --- reading the formats ------------------------------------------------------------------------------


def test_reads_the_2017_release_with_its_trailing_column_and_gzip(tmp_path, small_csv):
    expected = nih.read_metadata(small_csv)
    trailing = write(tmp_path / "2017.csv", [HEADER + ",", *(r + "," for r in ROWS)])
    rows_only = write(tmp_path / "rows.csv", [HEADER, *(r + "," for r in ROWS)])
    zipped = write(tmp_path / "Data_Entry_2017_v2020.csv.gz", [HEADER + ",", *(r + "," for r in ROWS)], gz=True)
    for path in (trailing, rows_only, zipped):
        assert nih.read_metadata(path).equals(expected)
    assert expected["labels"].tolist()[:3] == ["Cardiomegaly", "Cardiomegaly|Emphysema", "No Finding"]
    assert expected["width"].tolist() == [2682, 2894, 2500, 2048, 2048, 2048]


def test_old_style_ages_and_missing_optional_columns(tmp_path):
    path = write(tmp_path / "old.csv", ["Image Index,Finding Labels,Patient ID,Patient Age",
                                        "a.png,Mass,7,058Y", "b.png, Pleural_Thickening ,8,061Y"])
    df = nih.read_metadata(path)
    assert df["age"].tolist() == [58, 61] and df["labels"].tolist() == ["Mass", "Pleural_Thickening"]
    assert df["view"].isna().all() and df["width"].isna().all()


def test_label_matrix_in_paper_order(small_csv):
    y = nih.label_matrix(nih.read_metadata(small_csv))
    assert y.dtype == np.uint8 and y.shape == (6, 14)
    assert y[1].nonzero()[0].tolist() == [FINDINGS.index("Cardiomegaly"), FINDINGS.index("Emphysema")]
    assert y[2].sum() == 0  # No Finding
    assert y[3].nonzero()[0].tolist() == [13]  # Hernia is last in the paper's order


@pytest.mark.parametrize(
    "lines, problem",
    [
        ([HEADER.replace("Patient ID,", ""), *(r.replace(",1,58,", ",58,") for r in ROWS[:1])], "missing column"),
        ([HEADER, ROWS[0], ROWS[1].replace("Emphysema", "Hernai")], r"line 3: Finding Labels .* finding 'Hernai'"),
        ([HEADER, ROWS[0].replace("Cardiomegaly", "Cardiomegaly|No Finding")], r"line 2: .*'No Finding' together"),
        ([HEADER, ROWS[0].replace("Cardiomegaly", "Cardiomegaly|")], r"line 2: .*unknown finding ''"),
        ([HEADER, ROWS[0], ROWS[2], ROWS[0]], r"00000001_000.png appears more than once \(lines 2, 4\)"),
        ([HEADER, ROWS[0], ROWS[1].replace(",58,", ",old,")], r"line 3: age 'old' is not a number"),
        ([HEADER, ROWS[0].replace(",1,58,", ",,58,")], r"line 2 has an empty Patient ID"),
        ([HEADER, ROWS[0] + ",extra"], r"line 2 has a value \('extra'\) under no column name"),
        ([HEADER], None),  # a header alone is a valid, empty table
    ],
)
def test_malformed_metadata_is_a_data_error_naming_file_and_problem(tmp_path, lines, problem):
    path = write(tmp_path / "bad_metadata.csv", lines)
    if problem is None:
        assert len(nih.read_metadata(path)) == 0
        return
    with pytest.raises(DataError, match=problem) as info:
        nih.read_metadata(path)
    assert str(path) in str(info.value)


def test_missing_column_message_names_it(tmp_path):
    path = write(tmp_path / "m.csv", ["Image Index,Finding Label,Patient ID", "a.png,Mass,1"])
    with pytest.raises(DataError, match=r"m\.csv: missing column\(s\) Finding Labels"):
        nih.read_metadata(path)


def test_unreadable_or_absent_files(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.csv: ChestX-ray14 metadata not found"):
        nih.read_metadata(tmp_path / "nowhere.csv")
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"broken\.csv\.gz: cannot read"):
        nih.read_metadata(broken)
    with pytest.raises(DataError, match=r"test_list\.txt: split list not found"):
        nih.read_image_list(tmp_path / "test_list.txt")


# --- lists and boxes ----------------------------------------------------------------------------------


def lists_in(folder, train_val, test):
    write(folder / "train_val_list.txt", train_val)
    write(folder / "test_list.txt", test)
    return folder


def test_split_list_errors(tmp_path, small_csv):
    names = nih.read_metadata(small_csv)["image"]
    lists_in(tmp_path, ["00000001_000.png", "", "00000001_000.png"], ["00000002_000.png"])
    with pytest.raises(DataError, match=r"train_val_list\.txt: 1 images are listed more than once, first 00000001_000"):
        nih.read_official_lists(tmp_path, known=names)
    lists_in(tmp_path, ["00000001_000.png", "00000002_000.png"], ["00000002_000.png"])
    with pytest.raises(DataError, match=r"in both train_val_list.txt and test_list.txt, first 00000002_000.png"):
        nih.read_official_lists(tmp_path, known=names)
    lists_in(tmp_path, ["00000001_000.png"], ["00000002_000.png", "99999999_000.png"])
    with pytest.raises(DataError, match=r"test_list\.txt: 1 images are not in the metadata, first 99999999_000.png"):
        nih.read_official_lists(tmp_path, known=names)


def test_official_split_on_a_subset_and_films_outside_the_lists(tmp_path, small_csv):
    df = nih.read_metadata(small_csv)
    lists = nih.read_official_lists(lists_in(tmp_path, [r.split(",")[0] for r in ROWS[:4]],
                                             [r.split(",")[0] for r in ROWS[4:]]), known=df["image"])
    ptx = nih.select_task(df, "pneumothorax")  # drops the No Finding film, which is in train_val
    split = splits.make_split(ptx.df, "official", lists=lists, val=0.0)
    assert split.test == ("00000004_000.png", "00000005_000.png")
    assert set(split.train) == {"00000001_000.png", "00000001_001.png", "00000003_000.png"}
    short = splits.OfficialLists(lists.train_val[:2], lists.test, tmp_path)
    with pytest.raises(DataError, match=r"2 films of the metadata are in neither .* first 00000002_000.png"):
        splits.make_split(df, "official", lists=short)
    with pytest.raises(CxrError, match="test_list.txt"):
        splits.make_split(df, "official", lists=lists, test=0.2)


BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


@pytest.mark.parametrize(
    "lines, problem",
    [
        (["Image Index,Label,x,y,w,h", "a.png,Mass,1,2,3,4"], "expected the columns"),
        ([BOX_HEADER, "a.png,Mass,1,2,3,4", "a.png,Tumour,1,2,3,4"], r"line 3: unknown finding 'Tumour'"),
        ([BOX_HEADER, "a.png,Mass,1000,2,30,4"], r"line 2: box x=1000.0, y=2.0, w=30.0, h=4.0 is not inside"),
        ([BOX_HEADER, "a.png,Mass,1,2,-3,4"], r"line 2: box .* is not inside"),
        ([BOX_HEADER, "a.png,Mass,1,two,3,4"], r"line 2: y 'two' is not a number"),
        ([BOX_HEADER, "zzz.png,Mass,1,2,3,4"], r"1 boxed images are not in the metadata, first zzz.png"),
    ],
)
def test_malformed_boxes_are_data_errors(tmp_path, lines, problem):
    path = write(tmp_path / "BBox_List_2017.csv", lines)
    with pytest.raises(DataError, match=problem) as info:
        nih.read_boxes(path, known=["a.png"])
    assert str(path) in str(info.value)


def test_box_file_spelling_of_infiltration(tmp_path):
    path = write(tmp_path / "b.csv", [BOX_HEADER, "a.png,Infiltrate,1.5,2,3,4", "a.png,Mass,10,20,30,40"])
    boxes = nih.read_boxes(path)
    assert boxes["finding"].tolist() == ["Infiltration", "Mass"] and boxes["x"].tolist() == [1.5, 10.0]


# --- splits and statistics on small data --------------------------------------------------------------


def test_patient_split_never_divides_a_patient(small_csv):
    df = nih.read_metadata(small_csv)
    for seed in range(20):
        split = splits.make_split(df, "patient", seed=seed, val=0.2, test=0.2)
        parts = [split.train, split.val, split.test]
        assert sum(len(p) for p in parts) == 6 and all(parts)
        assert split.patient_overlap == {"train-val": 0, "train-test": 0, "val-test": 0}
        assert sum("00000001_" in name for name in split.train) in (0, 2)  # patient 1's two films stay together


def test_split_arguments_are_checked(small_csv):
    df = nih.read_metadata(small_csv)
    with pytest.raises(ValueError, match="unknown split"):
        splits.make_split(df, "by-age")
    with pytest.raises(CxrError, match="fractions"):
        splits.make_split(df, "patient", val=0.6, test=0.5)
    with pytest.raises(ValueError, match="needs NIH's lists"):
        splits.make_split(df, "official")
    with pytest.raises(ValueError, match="unknown task"):
        nih.select_task(df, "edema")


def test_weights_when_a_class_is_absent(small_csv):
    data = nih.select_task(nih.read_metadata(small_csv), "multilabel")
    with pytest.warns(UserWarning, match="a class has no films for Atelectasis, Effusion, Infiltration") as caught:
        weights = splits.class_weights(data)
    assert len(caught) == 1
    assert weights["Atelectasis"] == [1.0, 1.0]
    assert weights["Hernia"] == pytest.approx([6 / (2 * 5), 6 / (2 * 1)])
    with pytest.warns(UserWarning, match="no positive films for Atelectasis"):
        pw = splits.pos_weight(data.targets)
    assert pw[FINDINGS.index("Atelectasis")] == 1.0 and pw[FINDINGS.index("Pneumothorax")] == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both classes present: no warning
        assert splits.class_weights(nih.select_task(data.df, "pneumothorax"))["Pneumothorax"] == pytest.approx(5 / 4)
