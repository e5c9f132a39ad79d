"""The Ultralytics adapter reads the same numbers Ultralytics' own head decodes, for every YOLO family."""

from pathlib import Path

import pytest
import torch

from detkd.adapters import UltralyticsAdapter, create_teacher
from detkd.errors import DetkdError
from detkd.ultralytics_internals import ultralytics_offline

ultralytics_offline()
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils.ops import xyxy2xywh  # noqa: E402

FAMILIES = {"yolov8n.yaml": 16, "yolo11n.yaml": 16, "yolo26n.yaml": 1}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    torch.manual_seed(0)
    m = DetectionModel(request.param, nc=5, verbose=False)
    m.names = {i: f"c{i}" for i in range(5)}
    return m


def test_view_shapes_in_training_mode(model):
    adapter = UltralyticsAdapter(model)
    model.train()
    view = adapter.view(model(torch.rand(2, 3, 64, 96)))
    grids = [(64 // s, 96 // s) for s in (8, 16, 32)]
    assert adapter.strides == view.strides == [8, 16, 32]
    assert [tuple(f.shape[-2:]) for f in view.feats] == grids
    assert [f.shape[1] for f in view.feats] == adapter.channels
    a = sum(h * w for h, w in grids)
    assert view.cls_logits.shape == (2, a, 5)
    assert adapter.reg_max == view.reg_max == FAMILIES[model.yaml["yaml_file"]]
    assert view.box_ltrb.shape == (2, a, 4) and view.anchor_points.shape == (a, 2)
    if adapter.reg_max > 1:
        assert view.box_logits.shape == (2, a, 4, adapter.reg_max)
    else:
        assert view.box_logits is None
    assert view.cls_logits.requires_grad  # the student's view keeps the graph


def test_decoded_boxes_and_scores_equal_ultralytics_inference(model):
    adapter = UltralyticsAdapter(model)
    model.eval()
    with torch.no_grad():
        images = torch.rand(2, 3, 64, 64)
        preds = model(images)
        view = adapter.view(preds)
        raw = preds[1]["one2many"] if "one2many" in preds[1] else preds[1]
        head = adapter.head
        end2end = head.end2end
        expected = head._inference(raw)  # (N, 4 + nc, A): boxes (xywh, or xyxy for end-to-end heads) + sigmoid scores
    boxes = view.boxes_xyxy(pixels=True)
    boxes = boxes if end2end else xyxy2xywh(boxes)
    torch.testing.assert_close(boxes, expected[:, :4].transpose(1, 2), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(view.cls_logits.sigmoid(), expected[:, 4:].transpose(1, 2))


class _RunsWhenLoaded:
    """Unpickling this touches ``marker``: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_teacher_factory_recognises_the_checkpoint_kind(teacher_checkpoint, tmp_path):
    from detkd.data.synth import CLASSES

    teacher = create_teacher(teacher_checkpoint)
    assert isinstance(teacher, UltralyticsAdapter) and teacher.names == dict(enumerate(CLASSES))
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())

    torch.save({"backbone.conv.weight": torch.zeros(1)}, tmp_path / "state_dict.pt")  # e.g. a torchvision one
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    marker = tmp_path / "ran"
    torch.save({"model": _RunsWhenLoaded(marker)}, tmp_path / "foreign.pt")
    for name in ("state_dict.pt", "notes.pt", "foreign.pt"):
        with pytest.raises(DetkdError, match=rf"{name}: not a teacher checkpoint of a kind detkd knows"):
            create_teacher(tmp_path / name)
    assert not marker.exists()  # recognising a kind runs nothing in the file
    with pytest.raises(DetkdError, match="missing.pt: teacher checkpoint not found"):
        create_teacher(tmp_path / "missing.pt")
