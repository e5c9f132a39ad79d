import numpy as np

from detkd.data import check_dataset, load_data
from detkd.data.synth import CLASSES, SynthConfig, generate_synthetic, render_scene


def test_scene_is_a_pure_function_of_seed_split_index():
    a, boxes_a = render_scene(3, "train", 5, SynthConfig(imgsz=96))
    b, boxes_b = render_scene(3, "train", 5, SynthConfig(imgsz=96))
    c, _ = render_scene(4, "train", 5, SynthConfig(imgsz=96))
    d, _ = render_scene(3, "val", 5, SynthConfig(imgsz=96))
    assert np.array_equal(a, b) and boxes_a == boxes_b
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_scenes_cover_all_classes_and_sizes_from_tiny_to_large():
    cfg = SynthConfig(imgsz=160)
    boxes = [b for i in range(60) for b in render_scene(0, "train", i, cfg)[1]]
    assert {b[0] for b in boxes} == set(range(len(CLASSES))) and len(CLASSES) >= 6
    longer = np.array([max(b[3], b[4]) for b in boxes])
    assert (longer <= 8).sum() >= 0.1 * len(boxes)  # tiny objects are common
    assert longer.max() >= 0.4 * cfg.imgsz
    for _, x, y, w, h in boxes:
        assert x >= 0 and y >= 0 and x + w <= cfg.imgsz and y + h <= cfg.imgsz and w >= 2 and h >= 2


def test_generated_set_passes_checks_and_both_layouts_agree(tmp_path):
    data_yaml = generate_synthetic(tmp_path, train=6, val=4, seed=1, cfg=SynthConfig(imgsz=64))
    assert check_dataset(data_yaml).ok
    coco_json = tmp_path / "annotations" / "instances_val.json"
    assert check_dataset(coco_json).ok
    from_yolo, from_coco = load_data(data_yaml, split="val"), load_data(coco_json)
    assert [c.name for c in from_coco.categories] == list(CLASSES)
    assert len(from_yolo.images) == len(from_coco.images) == 4
    yolo_boxes = sorted((a.image_id, a.category_id, *np.round(a.bbox, 2)) for a in from_yolo.annotations)
    coco_boxes = sorted((a.image_id, a.category_id, *np.round(a.bbox, 2)) for a in from_coco.annotations)
    assert yolo_boxes == coco_boxes and len(coco_boxes) > 0
