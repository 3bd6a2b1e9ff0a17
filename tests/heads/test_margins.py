"""Margins: values, exact derivatives, the boundaries t = +-1, the past-pi rule, the straight-through switch."""

import math

import pytest
import torch

from partial_fc.errors import InputError
from partial_fc.heads import ArcFace, CombinedMargin, CosFace, as_margin

MARGINS = [ArcFace(s=30.0, margin=0.5), CosFace(s=30.0, margin=0.35), CombinedMargin(s=30.0, m1=0.9, m2=0.4, m3=0.15)]


def published_value(margin: CombinedMargin, cosine: torch.Tensor) -> torch.Tensor:
    theta = torch.acos(cosine)
    shifted = torch.cos(margin.m1 * theta + margin.m2)
    fallback = cosine - margin.m2 * math.sin(margin.m2)
    return margin.s * (torch.where(margin.m1 * theta + margin.m2 > math.pi, fallback, shifted) - margin.m3)


@pytest.mark.parametrize("margin", MARGINS, ids=str)
def test_value_matches_the_formula(margin):
    cosine = torch.linspace(-0.999, 0.999, 2001, dtype=torch.float64)
    assert torch.allclose(margin.target_logit(cosine), published_value(margin, cosine), rtol=0, atol=1e-12)


@pytest.mark.parametrize("margin", MARGINS, ids=str)
def test_derivative_matches_autograd_of_the_formula(margin):
    cosine = torch.linspace(-0.995, 0.995, 399, dtype=torch.float64).requires_grad_(True)
    published_value(margin, cosine).sum().backward()
    assert torch.allclose(margin.target_grad(cosine.detach()), cosine.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", MARGINS, ids=str)
def test_no_nan_or_inf_at_exactly_plus_and_minus_one(margin, dtype):
    cosine = torch.tensor([-1.0, 1.0], dtype=dtype)
    assert torch.isfinite(margin.target_logit(cosine)).all()
    assert torch.isfinite(margin.target_grad(cosine)).all()
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=dtype, requires_grad=True)
    out = margin(logits, torch.tensor([0, 1]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()


def test_arcface_past_pi_follows_the_published_rule():
    margin = ArcFace(s=1.0, margin=0.5)
    threshold = math.cos(math.pi - 0.5)
    below = torch.tensor([threshold - 1e-3, -1.0], dtype=torch.float64)
    expected = below - 0.5 * math.sin(0.5)
    assert torch.allclose(margin.target_logit(below), expected)
    assert torch.allclose(margin.target_grad(below), torch.ones_like(below))
    above = torch.tensor([threshold + 1e-3], dtype=torch.float64)
    assert torch.allclose(margin.target_logit(above), torch.cos(torch.acos(above) + 0.5))


def test_cosface_is_a_plain_shift_with_slope_s():
    margin = CosFace(s=64.0, margin=0.4)
    cosine = torch.tensor([-1.0, -0.3, 0.0, 0.7, 1.0], dtype=torch.float64)
    assert torch.allclose(margin.target_logit(cosine), 64.0 * (cosine - 0.4))
    assert torch.allclose(margin.target_grad(cosine), torch.full_like(cosine, 64.0))


def test_straight_through_variant_passes_the_scale_only():
    margin = ArcFace(s=64.0, margin=0.5, exact_grad=False)
    cosine = torch.tensor([0.2, 0.9], dtype=torch.float64)
    assert torch.equal(margin.target_grad(cosine), torch.full_like(cosine, 64.0))
    assert torch.allclose(margin.target_logit(cosine), ArcFace(s=64.0, margin=0.5).target_logit(cosine))


def test_call_interface_changes_only_the_positives():
    margin = ArcFace(s=10.0, margin=0.3)
    cosine = torch.tensor([[0.1, 0.5, -0.2], [0.3, 0.0, 0.9]], dtype=torch.float64)
    labels = torch.tensor([1, -1])
    out = margin(cosine, labels)
    expected = cosine * 10.0
    expected[0, 1] = 10.0 * math.cos(math.acos(0.5) + 0.3)
    assert torch.allclose(out, expected)


def test_arcface_torch_style_margin_objects_are_accepted():
    class CombinedMarginLoss:  # the attributes arcface_torch's class carries
        s, m1, m2, m3 = 64.0, 1.0, 0.0, 0.4

    assert as_margin(CombinedMarginLoss()) == CombinedMargin(s=64.0, m1=1.0, m2=0.0, m3=0.4)
    with pytest.raises(InputError, match="margin_loss"):
        as_margin(lambda logits, labels: logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"s": 0.0}, "scale s"), ({"m1": -1.0}, "m1"), ({"m2": 4.0}, "m2"), ({"m3": float("nan")}, "m3")],
)
def test_bad_margin_values_are_rejected(kwargs, message):
    with pytest.raises(InputError, match=message):
        CombinedMargin(**kwargs)
