import math

import torch

from segohem.metrics import ConfusionMatrix, format_table


def test_confusion_matrix_metrics_by_hand():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 1]])
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    m = cm.compute()
    # IoU: class0 1/(2+1-1)=0.5, class1 2/(2+4-2)=0.5, class2 0/(1+0-0)=0
    assert m["iou"] == [0.5, 0.5, 0.0]
    assert math.isclose(m["miou"], 1 / 3)
    assert math.isclose(m["pixel_acc"], 3 / 5)
    assert math.isclose(m["mean_acc"], (0.5 + 1.0 + 0.0) / 3)


def test_absent_classes_are_nan_and_excluded_from_the_mean():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]))
    m = cm.compute()
    assert m["iou"][0] == 1.0 and math.isnan(m["iou"][1]) and m["miou"] == 1.0
    table = format_table(m, ["a", "b", "c"])
    assert "mIoU" in table and "100.00" in table
