import contextlib
import io
import random
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkd.data.dataset import Annotation, Category, DetectionDataset, ImageRecord
from detkd.errors import DetkdError
from detkd.evaluation import COCO_METRICS, ap_per_class, class_to_category, coco_evaluate, format_table
from detkd.utils import save_json


def _dataset(boxes_per_image: dict[int, list[tuple[int, list[float]]]]) -> DetectionDataset:
    images = [ImageRecord(i, f"{i}.jpg", Path(f"/nonexistent/{i}.jpg"), 640, 480) for i in boxes_per_image]
    pairs = [(image_id, cat, box) for image_id, boxes in boxes_per_image.items() for cat, box in boxes]
    anns = [Annotation(k + 1, image_id, cat, box) for k, (image_id, cat, box) in enumerate(pairs)]
    return DetectionDataset(images, anns, [Category(1, "car"), Category(7, "bus")], source=Path("gt.json"))


def test_perfect_detections_score_one():
    gt = _dataset({3: [(1, [10, 10, 50, 40]), (7, [100, 100, 200, 150])], 9: [(1, [5, 5, 20, 20])]})
    dets = [
        {"image_id": a.image_id, "category_id": a.category_id, "bbox": a.bbox, "score": 0.9} for a in gt.annotations
    ]
    m = coco_evaluate(gt, dets)
    assert m["AP"] == m["AP50"] == m["AP75"] == m["AR100"] == 1.0
    assert (m["APs"], m["APm"], m["APl"]) == pytest.approx((1.0, 1.0, 1.0))  # areas 400, 2000, 30000: one per bucket


def test_single_box_at_known_iou_gives_the_fraction_of_thresholds_it_passes():
    # GT 100x100 at the origin; detection shifted right by 23.5 px: IoU = 76.5*100 / (123.5*100) = 0.619...
    # passes IoU thresholds 0.50, 0.55, 0.60 of the ten 0.50:0.05:0.95 -> AP = 3/10, AP50 = 1, AP75 = 0
    gt = _dataset({1: [(1, [0, 0, 100, 100])]})
    m = coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [23.5, 0, 100, 100], "score": 0.5}])
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(0.3)
    assert m["APs"] == -1.0  # no small objects: COCO reports -1, not 0


def test_ap_per_class_is_each_category_alone_and_averages_to_ap():
    # car: the 0.619-IoU box of the test above (AP 0.3); bus: a perfect box (AP 1); mean 0.65 = the overall AP
    gt = _dataset({1: [(1, [0, 0, 100, 100]), (7, [200, 200, 100, 100])]})
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [23.5, 0, 100, 100], "score": 0.5},
        {"image_id": 1, "category_id": 7, "bbox": [200, 200, 100, 100], "score": 0.9},
    ]
    per_class = ap_per_class(gt, dets)
    assert per_class == pytest.approx({"car": 0.3, "bus": 1.0})
    assert coco_evaluate(gt, dets)["AP"] == pytest.approx(0.65)
    assert ap_per_class(_dataset({1: [(1, [0, 0, 100, 100])]}), [])["bus"] == -1.0  # no bus in the set


def test_no_detections_is_zero_not_an_error():
    m = coco_evaluate(_dataset({1: [(1, [0, 0, 100, 100])]}), [])
    assert m["AP"] == 0.0 and m["AR100"] == 0.0


def test_equals_pycocotools_on_saved_files(tmp_path):
    rng = random.Random(0)
    gt = _dataset(
        {
            i: [
                (
                    rng.choice([1, 7]),
                    [rng.uniform(0, 400), rng.uniform(0, 300), rng.uniform(4, 200), rng.uniform(4, 150)],
                )
                for _ in range(rng.randint(0, 6))
            ]
            for i in range(1, 21)
        }
    )
    dets = []
    for a in gt.annotations:  # noisy copies, some with the wrong class, plus false positives
        x, y, w, h = a.bbox
        j = [rng.gauss(0, 0.1 * w), rng.gauss(0, 0.1 * h), rng.gauss(0, 0.1 * w), rng.gauss(0, 0.1 * h)]
        cat = a.category_id if rng.random() < 0.8 else 8 - a.category_id
        dets.append(
            {
                "image_id": a.image_id,
                "category_id": cat,
                "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                "score": rng.random(),
            }
        )
    dets += [
        {"image_id": rng.randint(1, 20), "category_id": 1, "bbox": [10, 10, 30, 30], "score": rng.random() * 0.3}
        for _ in range(15)
    ]
    ours = coco_evaluate(gt, dets)

    gt_file, det_file = save_json(gt.to_coco(), tmp_path / "gt.json"), save_json(dets, tmp_path / "dets.json")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        e = COCOeval(coco_gt, coco_gt.loadRes(str(det_file)), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert [ours[k] for k in COCO_METRICS] == pytest.approx(list(e.stats), abs=1e-12)
    assert 0.1 < ours["AP"] < 0.9  # a non-trivial case


def test_classes_map_to_categories_by_name():
    gt = _dataset({1: []})
    assert class_to_category({0: "Bus", 1: "person", 2: "car"}, gt) == {0: 7, 2: 1}
    with pytest.raises(DetkdError, match="gt.json"):
        class_to_category({0: "zebra"}, gt)


def test_table_has_a_row_per_metric_and_a_column_per_model():
    m = dict.fromkeys(COCO_METRICS, 0.5)
    table = format_table({"teacher": m, "student": m}).splitlines()
    assert len(table) == 13 and "teacher" in table[0] and "student" in table[0]
