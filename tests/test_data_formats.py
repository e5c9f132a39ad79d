"""Loading, writing and converting COCO and YOLO sets: what must survive each step, and how bad input fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from detkd.data import DetectionDataset, convert, load_coco, load_data, load_yolo, write_coco, write_yolo
from detkd.data.coco import guess_split
from detkd.data.yolo import META_FILE, image_size, label_file
from detkd.errors import DetkdError


def box_set(ds: DetectionDataset) -> list[tuple]:
    """Annotations without their ids (which conversions may renumber), boxes rounded far below a pixel."""
    return sorted(
        (a.image_id, a.category_id, a.iscrowd, *(round(v, 4) for v in a.bbox), round(a.area or a.box_area(), 3))
        for a in ds.annotations
    )


def read_labels(root: Path) -> dict[str, list[float]]:
    """Every label file under ``root``, its numbers in one flat list (compared with ``pytest.approx``)."""
    return {
        p.relative_to(root).as_posix(): [float(v) for v in p.read_text().split()]
        for p in sorted(root.rglob("labels/**/*.txt"))
    }


# --- COCO


def test_load_coco_keeps_ids_and_finds_images_one_folder_up(coco_json):
    ds = load_coco(coco_json)
    assert ds.split == "val" and ds.source == coco_json
    assert ds.names == {1: "person", 3: "car", 90: "toothbrush"}
    assert [im.id for im in ds.images] == [17, 42, 5]
    assert all(im.path.is_file() and im.path.is_absolute() for im in ds.images)
    assert ds.images[1].path == coco_json.parent.parent / "images/val/b.png"
    crowd = [a for a in ds.annotations if a.iscrowd]
    assert [(a.id, a.image_id, a.category_id, a.area) for a in crowd] == [(9, 42, 3, 700.0)]


def test_load_coco_finds_images_beside_the_json_or_in_images_dir(coco_json, tmp_path):
    beside = tmp_path / "beside"
    shutil.copytree(coco_json.parent.parent / "images", beside / "images")
    shutil.copy(coco_json, beside / "train2017.json")
    ds = load_coco(beside / "train2017.json")
    assert ds.split == "train" and ds.images[0].path == beside / "images/val/a.jpg"
    ds = load_coco(coco_json, images_dir=beside, split="minival")
    assert ds.split == "minival" and ds.images[0].path == beside / "images/val/a.jpg"


@pytest.mark.parametrize(
    ("stem", "split"),
    [
        ("instances_val", "val"),
        ("instances_val2017", "val"),
        ("instances_train2017", "train"),
        ("test-dev", "test"),
        ("my_validation_set", "val"),
        ("annotations", "val"),
    ],
)
def test_guess_split_from_file_name(stem, split):
    assert guess_split(stem) == split


def test_write_coco_then_load_gives_the_same_set(coco_json, tmp_path):
    ds = load_coco(coco_json)
    again = load_coco(write_coco(ds, tmp_path / "out" / "instances_val.json"), images_dir=coco_json.parent.parent)
    assert again.names == ds.names and box_set(again) == box_set(ds)
    assert [(im.id, im.file_name, im.width, im.height) for im in again.images] == [
        (im.id, im.file_name, im.width, im.height) for im in ds.images
    ]


# --- YOLO


def test_load_plain_yolo_numbers_images_and_uses_class_indices(yolo_yaml):
    ds = load_yolo(yolo_yaml, "val")
    assert ds.split == "val" and ds.names == {0: "cat", 1: "dog"}
    assert [(im.id, im.file_name, im.width, im.height) for im in ds.images] == [
        (1, "images/val/v1.jpg", 48, 32),
        (2, "images/val/v2.jpg", 32, 32),
    ]
    # "0 0.3125 0.5 0.125 0.25" and "1 0.75 0.25 0.25 0.5" in a 48x32 image; v2 has no label file
    assert [(a.image_id, a.category_id, a.bbox, a.iscrowd) for a in ds.annotations] == [
        (1, 0, [12.0, 12.0, 6.0, 8.0], 0),
        (1, 1, [30.0, 0.0, 12.0, 16.0], 0),
    ]
    assert [a.id for a in load_yolo(yolo_yaml, "train").annotations] == [1, 2, 3]


def test_load_yolo_accepts_path_key_txt_lists_and_names_dict(yolo_yaml, tmp_path):
    root = yolo_yaml.parent
    (root / "val.txt").write_text(f"./images/val/v2.jpg\n{root / 'images/val/v1.jpg'}\n\n")
    elsewhere = tmp_path / "configs" / "mine.yml"
    elsewhere.parent.mkdir()
    for path_key in ("../yolo", str(root)):  # relative to the yaml's folder, or absolute
        elsewhere.write_text(yaml.safe_dump({"path": path_key, "val": "val.txt", "names": {0: "cat", 1: "dog"}}))
        ds = load_yolo(elsewhere)
        assert [im.file_name for im in ds.images] == ["images/val/v1.jpg", "images/val/v2.jpg"]
        assert len(ds.annotations) == 2 and ds.names == {0: "cat", 1: "dog"}


def test_label_file_follows_ultralytics_rule():
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.data.utils import img2label_paths

    images = ["/d/images/set/images/val/a.b.jpg", "/d/train/images/x.png", "rel/images/v/y.jpeg"]
    assert [str(label_file(Path(p))) for p in images] == img2label_paths(images)


def test_image_size_applies_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display, as phones write it
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert image_size(path) == (20, 40)


def test_write_yolo_set_is_accepted_by_ultralytics_and_can_move(coco_json, tmp_path):
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()
    from ultralytics.data.utils import check_det_dataset

    ds = load_coco(coco_json)
    data_yaml = write_yolo({"train": ds, "val": ds}, tmp_path / "set")
    data = yaml.safe_load(data_yaml.read_text())
    assert data == {
        "train": "images/train",
        "val": "images/val",
        "names": {0: "person", 1: "car", 2: "toothbrush"},
        "detkd": {"category_ids": [1, 3, 90], "meta": META_FILE},
    }
    checked = check_det_dataset(str(data_yaml))
    assert checked["names"] == {0: "person", 1: "car", 2: "toothbrush"} and checked["nc"] == 3
    assert Path(checked["val"]) == (tmp_path / "set/images/val").resolve()

    moved = shutil.move(tmp_path / "set", tmp_path / "moved")
    again = load_yolo(Path(moved) / "data.yaml", "train")
    assert again.names == ds.names and box_set(again) == box_set(ds)


def test_yolo_labels_hold_no_crowd_boxes_and_backgrounds_get_empty_files(coco_json, tmp_path):
    labels = read_labels(convert(coco_json, "yolo", tmp_path / "out").parent)
    assert list(labels) == ["labels/val/a.txt", "labels/val/b.txt", "labels/val/c.txt"]
    assert labels["labels/val/a.txt"] == pytest.approx(
        [0, 7.5 / 32, 9.25 / 32, 10 / 32, 12 / 32, 2, 26 / 32, 4.25 / 32, 12 / 32, 8.5 / 32], abs=1e-8
    )
    assert labels["labels/val/b.txt"] == pytest.approx([1, 33.125 / 48, 7.5 / 32, 6 / 48, 7 / 32], abs=1e-8)
    assert labels["labels/val/c.txt"] == []


def test_sidecar_holds_ids_areas_and_crowd_boxes_and_new_files_get_fresh_ids(coco_json, tmp_path, write_image):
    data_yaml = write_yolo({"val": load_coco(coco_json)}, tmp_path / "set")
    meta = json.loads((tmp_path / "set" / META_FILE).read_text())
    assert meta["splits"]["val"]["images/val/b.png"] == {
        "id": 42,
        "areas": [40.0],
        "crowd": [{"category_id": 3, "bbox": [0.0, 10.0, 48.0, 20.0], "area": 700.0}],
    }
    assert meta["splits"]["val"]["images/val/c.jpg"] == {"id": 5, "areas": []}

    write_image(tmp_path / "set/images/val/added.jpg")  # a user adds an image the sidecar does not know
    (tmp_path / "set/labels/val/a.txt").write_text("0 0.5 0.5 0.5 0.5\n")  # and edits labels: areas are stale
    ds = load_yolo(data_yaml)
    assert sorted(im.id for im in ds.images) == [5, 17, 42, 43]
    assert [a.area for a in ds.annotations if a.image_id == 17] == [None]
    assert [a.area for a in ds.annotations if a.image_id == 42] == [40.0, 700.0]


# --- conversions


def test_coco_to_yolo_to_coco_keeps_names_ids_crowd_flags_areas_and_boxes(coco_json, tmp_path):
    data_yaml = convert(coco_json, "yolo", tmp_path / "yolo")
    assert data_yaml == tmp_path / "yolo/data.yaml" and "path" not in yaml.safe_load(data_yaml.read_text())
    back_json = convert(data_yaml, "coco", tmp_path / "coco")
    assert back_json == tmp_path / "coco/annotations/instances_val.json"

    original, back = load_coco(coco_json), load_coco(back_json)
    assert back.names == original.names and [c.id for c in back.categories] == [1, 3, 90]
    assert sorted(im.id for im in back.images) == [5, 17, 42]
    assert box_set(back) == box_set(original)  # includes crowd flags and COCO areas
    assert sorted((im.id, im.width, im.height) for im in back.images) == sorted(
        (im.id, im.width, im.height) for im in original.images
    )
    assert all(im.file_name.startswith("images/val/") and im.path.is_file() for im in back.images)


def test_yolo_to_coco_to_yolo_keeps_labels(yolo_yaml, tmp_path):
    val_json = convert(yolo_yaml, "coco", tmp_path / "coco")
    assert sorted(p.name for p in (tmp_path / "coco/annotations").iterdir()) == [
        "instances_train.json",
        "instances_val.json",
    ]
    coco_val = load_coco(val_json)
    assert coco_val.names == {0: "cat", 1: "dog"} and [im.id for im in coco_val.images] == [1, 2]
    assert coco_val.images[0].path == tmp_path / "coco/images/val/v1.jpg"

    for split in ("train", "val"):
        again = convert(tmp_path / f"coco/annotations/instances_{split}.json", "yolo", tmp_path / "yolo" / split)
        labels = read_labels(again.parent)
        original = read_labels(yolo_yaml.parent)
        for name, rows in labels.items():
            assert rows == pytest.approx(original.get(name, []), abs=1e-7), name  # v2 had no file: now an empty one
        assert {n for n in original if n.startswith(f"labels/{split}/")} <= set(labels)


def test_convert_rejects_an_unknown_target(coco_json, tmp_path):
    with pytest.raises(DetkdError, match="expected 'coco' or 'yolo'"):
        convert(coco_json, "voc", tmp_path / "out")


def test_write_yolo_refuses_two_images_with_one_name(coco_json, tmp_path):
    data = json.loads(coco_json.read_text())
    data["images"][2]["file_name"] = "elsewhere/a.jpg"
    shutil.copy(coco_json.parent.parent / "images/val/c.jpg", tmp_path / "a.jpg")
    coco_json.write_text(json.dumps(data))
    ds = load_coco(coco_json)
    ds.images[2].path = tmp_path / "a.jpg"
    with pytest.raises(DetkdError, match="a.jpg would both be images/val/a.jpg"):
        write_yolo({"val": ds}, tmp_path / "out")


def test_load_data_dispatches_by_suffix(coco_json, yolo_yaml):
    assert [im.id for im in load_data(coco_json).images] == [17, 42, 5]
    assert len(load_data(yolo_yaml, split="train").images) == 2


# --- bad input: one line naming the file, never a KeyError or JSONDecodeError


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("x.json", "{not json", "cannot parse"),
        ("x.json", "[1, 2]", "expected a mapping"),
        ("x.json", '{"annotations": [], "categories": []}', "missing key 'images'"),
        ("x.json", '{"images": [], "annotations": []}', "missing key 'categories'"),
        (
            "x.json",
            '{"images": [{"id": 1}], "annotations": [], "categories": []}',
            r"images\[0\] missing key 'file_name'",
        ),
        ("x.json", '{"images": {}, "annotations": [], "categories": []}', "'images' must be a list"),
        (
            "x.json",
            '{"images": [], "categories": [], '
            '"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2]}]}',
            r"annotations\[0\] is malformed \(bbox has 2 values",
        ),
        ("x.yaml", "train: [unclosed", "cannot parse"),
        ("x.yaml", "val: images/val\n", "missing key 'names'"),
        ("x.yaml", "names:\nval: images/val\n", "missing key 'names'"),
        ("x.yaml", "names: [a]\ntrain: images/train\n", "missing key 'val'"),
        ("x.yaml", "names: 3\nval: images/val\n", "'names' must be a list or a mapping"),
        ("x.yaml", "names: [a]\nval: nowhere\n", "'val' path .*nowhere does not exist"),
        ("x.yaml", "names: [a]\nval: .\ndetkd: {category_ids: [1, 2], meta: m.json}\n", "2 ids for 1 names"),
        ("x.yaml", "names: [a]\nval: .\ndetkd: {category_ids: [1], meta: m.json}\n", "m.json: file not found"),
        ("x.txt", "", "expected a COCO instances .json or a YOLO data .yaml"),
    ],
)
def test_bad_input_raises_one_line_naming_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DetkdError, match=message) as caught:
        load_data(path, check=False)
    assert str(caught.value).startswith(str(tmp_path)) and "\n" not in str(caught.value)


def test_missing_file_is_named(tmp_path):
    for name in ("none.json", "none.yaml"):
        with pytest.raises(DetkdError, match=f"{name}: file not found"):
            load_data(tmp_path / name)


def test_bad_label_line_or_image_fails_loading_with_the_file_named(yolo_yaml):
    from detkd.ultralytics_internals import ultralytics_offline

    ultralytics_offline()  # Ultralytics patches PIL's Image.open: unknown files must still read as unreadable
    (yolo_yaml.parent / "labels/val/v1.txt").write_text("0 0.5 0.5 0.1 0.1\n7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DetkdError, match=r"labels/val/v1.txt:2: class 7 is not in the names"):
        load_yolo(yolo_yaml)
    (yolo_yaml.parent / "labels/val/v1.txt").write_text("0 0.5 0.5 0.1\n")
    with pytest.raises(DetkdError, match=r"labels/val/v1.txt:1: expected 5 fields"):
        load_yolo(yolo_yaml)
    (yolo_yaml.parent / "labels/val/v1.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (yolo_yaml.parent / "images/val/v2.jpg").write_bytes(b"not an image")
    with pytest.raises(DetkdError, match=r"images/val/v2.jpg: cannot read image"):
        load_yolo(yolo_yaml, "val")
