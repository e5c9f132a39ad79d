"""check_dataset finds each kind of broken data, names the file, and stops loading and conversion on errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from detkd.data import check as c
from detkd.data import check_dataset, convert, load_data
from detkd.errors import DataError, DetkdError


def problems(report) -> dict[str, tuple[int, list[str]]]:
    return {p.kind: (p.count, p.files) for p in report.errors + report.warnings}


def edit_json(path: Path, edit) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_clean_sets_pass(coco_json, yolo_yaml):
    coco = check_dataset(coco_json)
    assert coco.ok and not coco.errors and not coco.warnings and (coco.images, coco.boxes) == (3, 4)
    assert coco.format() == f"{coco_json}: OK (3 images, 4 boxes checked)"

    yolo = check_dataset(yolo_yaml)
    assert yolo.ok and (yolo.images, yolo.boxes) == (4, 5)
    # an image without a label file is a background image to Ultralytics: a warning, not an error
    assert problems(yolo) == {c.MISSING_LABEL: (1, ["labels/val/v2.txt"])}
    assert yolo.format().splitlines()[0] == f"{yolo_yaml}: OK, 1 warning (4 images, 5 boxes checked)"
    yolo.raise_if_errors()  # nothing to raise


def test_truncated_and_undecodable_images_are_unreadable(yolo_yaml):
    root = yolo_yaml.parent
    truncate(root / "images/val/v1.jpg")
    with Image.open(root / "images/val/v1.jpg") as im:
        assert im.size == (48, 32)  # the header still reads: only a full decode finds the damage
    (root / "images/train/t2.jpg").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = check_dataset(yolo_yaml)
    assert problems(report)[c.UNREADABLE_IMAGE] == (2, ["images/train/t2.jpg", "images/val/v1.jpg"])
    assert not report.ok


def test_truncated_png_in_coco_is_unreadable(coco_json):
    truncate(coco_json.parent.parent / "images/val/b.png", keep=0.5)
    assert problems(check_dataset(coco_json)) == {c.UNREADABLE_IMAGE: (1, ["images/val/b.png"])}


def test_missing_and_twice_listed_images(yolo_yaml, coco_json):
    root = yolo_yaml.parent
    (root / "val.txt").write_text("./images/val/v1.jpg\n./images/val/gone.jpg\n./images/val/v1.jpg\n")
    (root / "data.yaml").write_text("train: images/train\nval: val.txt\nnames: [cat, dog]\n")
    found = problems(check_dataset(yolo_yaml, splits=["val"]))
    assert found[c.MISSING_IMAGE] == (1, ["images/val/gone.jpg"])
    assert found[c.DUPLICATE_IMAGE] == (1, ["images/val/v1.jpg"])

    (coco_json.parent.parent / "images/val/c.jpg").unlink()
    assert problems(check_dataset(coco_json)) == {c.MISSING_IMAGE: (1, ["images/val/c.jpg"])}


def test_label_line_problems_are_named_by_file_and_line(yolo_yaml):
    (yolo_yaml.parent / "labels/train/t1.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"  # fine
        "0 0.5 0.5 0.2\n"  # 2: four fields
        "0 0.5 zero 0.2 0.2\n"  # 3: not a number
        "1.5 0.5 0.5 0.2 0.2\n"  # 4: not a class index
        "2 0.5 0.5 0.2 0.2\n"  # 5: class beyond the names
        "1 0.5 0.5 0.0 0.2\n"  # 6: zero width
        "1 0.5 0.5 0.2 -0.1\n"  # 7: negative height
        "0 0.95 0.5 0.2 0.2\n"  # 8: right edge at 1.05
        "0 0.5 0.5 1.01 1.0\n"  # within Ultralytics' 1 % tolerance
    )
    found = problems(check_dataset(yolo_yaml))
    t1 = "labels/train/t1.txt"
    assert found[c.MALFORMED_LINE] == (3, [f"{t1}:2", f"{t1}:3", f"{t1}:4"])
    assert found[c.UNKNOWN_CLASS] == (1, [f"{t1}:5: class 2"])
    assert found[c.DEGENERATE_BOX] == (2, [f"{t1}:6", f"{t1}:7"])
    assert found[c.OUT_OF_RANGE] == (1, [f"{t1}:8"])


@pytest.mark.parametrize(
    ("edit", "kind", "name"),
    [  # edit: (section, index, key, value) sets one field; (section, value) appends an entry
        (("images", 2, "id", 17), c.DUPLICATE_IMAGE_ID, "images/val/c.jpg (id 17)"),
        (("annotations", 3, "id", 1), c.DUPLICATE_ANNOTATION_ID, "annotation 1"),
        (("annotations", 1, "image_id", 99), c.UNKNOWN_IMAGE_ID, "annotation 2: image id 99"),
        (("annotations", 1, "category_id", 7), c.UNKNOWN_CLASS, "images/val/a.jpg (annotation 2): category id 7"),
        (("annotations", 3, "bbox", [40.0, 4.0, 9.0, 7.0]), c.OUT_OF_RANGE, "images/val/b.png (annotation 12)"),
        (("annotations", 0, "bbox", [2.0, 3.0, 10.0, 0.0]), c.DEGENERATE_BOX, "images/val/a.jpg (annotation 1)"),
        (
            ("images", {"id": 77, "file_name": "images/val/a.jpg", "width": 32, "height": 32}),
            c.DUPLICATE_IMAGE,
            "images/val/a.jpg",
        ),
        (("categories", {"id": 3, "name": "auto"}), c.DUPLICATE_CATEGORY_ID, "category 3 'auto'"),
    ],
)
def test_each_coco_problem_is_found_once_and_named(coco_json, edit, kind, name):
    def apply(data):
        if len(edit) == 2:
            data[edit[0]].append(edit[1])
        else:
            section, index, key, value = edit
            data[section][index][key] = value

    report = check_dataset(edit_json(coco_json, apply))
    assert problems(report) == {kind: (1, [name])}
    assert report.format().splitlines()[1] == f"  error: {kind} (1): {name}"


def test_report_lists_ten_names_then_counts_the_rest(yolo_yaml):
    (yolo_yaml.parent / "labels/val/v1.txt").write_text("0 0.5\n" * 13)
    report = check_dataset(yolo_yaml, splits=["val"])
    text = report.format()
    assert text.splitlines()[0] == f"{yolo_yaml}: 13 errors, 1 warning (2 images, 0 boxes checked)"
    assert "labels/val/v1.txt:10, and" not in text and text.splitlines()[1].endswith("labels/val/v1.txt:10 and 3 more")
    with pytest.raises(
        DataError, match=r": 13 data errors \(first: malformed label line \(13\): .*v1.txt:1 and 12 more\)"
    ):
        report.raise_if_errors()


def test_empty_split_is_an_error_and_checked_splits_can_be_chosen(yolo_yaml):
    for image in (yolo_yaml.parent / "images/val").iterdir():
        image.unlink()
    assert problems(check_dataset(yolo_yaml)) == {c.EMPTY_SPLIT: (1, ["val: images/val"])}
    assert check_dataset(yolo_yaml, splits=["train"]).ok


def test_check_without_any_split_says_so(tmp_path):
    (tmp_path / "d.yaml").write_text("names: [a]\n")
    with pytest.raises(DetkdError, match=r"d.yaml: missing key 'val'"):
        check_dataset(tmp_path / "d.yaml")


def test_load_data_refuses_broken_data_with_the_report(yolo_yaml, coco_json):
    truncate(yolo_yaml.parent / "images/val/v1.jpg")
    with pytest.raises(
        DataError, match=r"data.yaml: 1 data errors \(first: unreadable image \(1\): images/val/v1.jpg\)"
    ) as caught:
        load_data(yolo_yaml, split="val")
    assert problems(caught.value.report)[c.UNREADABLE_IMAGE] == (1, ["images/val/v1.jpg"])
    assert len(load_data(yolo_yaml, split="train").images) == 2  # only the split asked for is checked

    edit_json(coco_json, lambda d: d["annotations"].append({**d["annotations"][0], "image_id": 99}))
    with pytest.raises(DataError) as caught:
        load_data(coco_json)
    assert "annotation 1: image id 99" in caught.value.report.format()
    assert len(load_data(coco_json, check=False).annotations) == 5


def test_convert_refuses_data_that_fails_the_check(coco_json, tmp_path):
    (coco_json.parent.parent / "images/val/a.jpg").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        convert(coco_json, "yolo", tmp_path / "out")
    assert problems(caught.value.report) == {c.UNREADABLE_IMAGE: (1, ["images/val/a.jpg"])}
    assert not (tmp_path / "out").exists()
