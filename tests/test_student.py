"""Students made from a teacher backbone (stepdistill/models/student.py)."""

import torch

from stepdistill.models.student import copy_backbone, disable_label_dropout
from stepdistill.testing.tiny_pipelines import build_tiny_backbone


def _dit_call(model):
    g = torch.Generator().manual_seed(0)
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn(64, c, s, s, generator=g)
    labels = torch.arange(64) % 10
    t = torch.full((64,), 500)
    return lambda: model(x, timestep=t, class_labels=labels).sample


def test_train_mode_dit_drops_labels_unless_disabled():
    """Stock DiT in train mode swaps ~10% of the labels for the null class on every call, so two calls on the same
    batch disagree; the students stepdistill makes must not (sCM's JVP and F_theta, LCM's student and target)."""
    teacher = build_tiny_backbone("dit").train()
    call = _dit_call(teacher)
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(call(), call()), "stock train-mode DiT should drop labels at random (test premise)"

    student = copy_backbone(teacher)
    assert student.training
    assert disable_label_dropout(student) == 0  # copy_backbone already turned it off
    call = _dit_call(student)
    with torch.no_grad():
        assert torch.equal(call(), call())
        teacher.eval()
        # the null-class row is kept: explicit unconditional calls still work and the student equals the teacher
        assert torch.allclose(call(), _dit_call(teacher)(), atol=1e-5)

