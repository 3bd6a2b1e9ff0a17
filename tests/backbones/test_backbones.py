"""Backbone registry and networks: arcface_torch state_dict compatibility (keys, shapes, embeddings) and behaviour.

The reference side lives in tests/fixtures/arcface_torch: a manifest of arcface_torch's own state_dict keys and
shapes and its eval-mode embeddings under weights recomputed here from a seeded formula (see make_fixtures.py).
"""

from __future__ import annotations

import gzip
import importlib.util
import json

import numpy as np
import pytest
import torch

from partial_fc.backbones import get_model, list_models, register_model, registry
from partial_fc.backbones.vit import DropPath
from partial_fc.errors import InputError
from tests.launchers import REPO

FIXTURES = REPO / "tests" / "fixtures" / "arcface_torch"
_spec = importlib.util.spec_from_file_location("arcface_fixtures", FIXTURES / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

with gzip.open(FIXTURES / "manifest.json.gz", "rt", encoding="utf-8") as _handle:
    MANIFEST = json.load(_handle)
EMBEDDINGS = dict(np.load(FIXTURES / "embeddings.npz"))

ARCFACE_NAMES = {
    "r18",
    "r34",
    "r50",
    "r100",
    "r200",
    "mbf",
    "mbf_large",
    "vit_t",
    "vit_t_dp005_mask0",
    "vit_s",
    "vit_s_dp005_mask_0",
    "vit_b",
    "vit_b_dp005_mask_005",
}
HUGE = {"r2060", "vit_h"}  # forward checked on the meta device only
SLOW = {
    "r50",
    "mbf_large",
    "r100",
    "r200",
    "vit_s",
    "vit_s_dp005_mask_0",
    "vit_b",
    "vit_b_dp005_mask_005",
    "vit_l_dp005_mask_005",
}


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def _with_fixture_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Give a model the seeded formula's weights (sane activations, unlike a fresh init in eval mode)."""
    model.load_state_dict(fixtures.deterministic_state(_shapes(model)), strict=True)
    return model


def _marked(names, slow):
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in sorted(names)]


def test_registry_covers_arcface_torch_names():
    assert ARCFACE_NAMES <= set(MANIFEST["networks"]) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", _marked(MANIFEST["networks"], {"r2060"}))
def test_state_dict_keys_and_shapes_equal_arcface_torch(name):
    with torch.device("meta"):
        ours = _shapes(get_model(name, dropout=0.0, fp16=False, num_features=512))
    reference = MANIFEST["networks"][name]
    assert sorted(set(reference) - set(ours)) == [], "keys arcface_torch has and we lack"
    assert sorted(set(ours) - set(reference)) == [], "keys we have and arcface_torch lacks"
    assert {key: shape for key, shape in ours.items() if reference[key] != shape} == {}


def test_fixture_formula_is_reproduced():
    x = fixtures.fixed_input()
    assert np.allclose(EMBEDDINGS["input_checksum"], [x.double().abs().sum().item(), x.double().sum().item()])
    for name in fixtures.EMBEDDING_NETWORKS:
        state = fixtures.deterministic_state(MANIFEST["embedding_fixtures"][name])
        assert fixtures.state_checksum(state) == pytest.approx(EMBEDDINGS[f"{name}_state_checksum"][0], rel=1e-12)


@pytest.mark.parametrize("name", fixtures.EMBEDDING_NETWORKS)
def test_arcface_torch_weights_give_the_reference_embeddings(name):
    shapes = MANIFEST["embedding_fixtures"][name]
    model = get_model(name, num_features=MANIFEST["embedding_size"])
    model.load_state_dict(fixtures.deterministic_state(shapes), strict=True)
    with torch.no_grad():
        ours = model.eval()(fixtures.fixed_input())
    reference = torch.from_numpy(EMBEDDINGS[name])
    assert ours.shape == reference.shape == (2, MANIFEST["embedding_size"])
    assert reference.std() > 0.1  # the fixture is not degenerate
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", _marked(set(list_models()) - HUGE, SLOW))
def test_forward_shape_dtype_and_eval_determinism(name):
    model = _with_fixture_weights(get_model(name, embedding_size=64)).eval()
    assert model.embedding_size == 64
    x = fixtures.fixed_input()
    with torch.no_grad():
        first, again, alone = model(x), model(x), model(x[:1])
    assert first.shape == (2, 64) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(again, first)
    scale = float(first.abs().max())  # deep IResNets reach large values under the formula's weights
    torch.testing.assert_close(alone, first[:1], atol=1e-4 * scale, rtol=1e-4)  # no batch dependence in eval


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_networks_forward_shape_on_meta(name):
    with torch.device("meta"):
        model = get_model(name, embedding_size=96).eval()
        out = model(torch.empty(3, 3, 112, 112))
    assert out.shape == (3, 96)


def test_unknown_network_names_the_nearest():
    with pytest.raises(InputError, match=r"'r5O'.*did you mean 'r50'"):
        get_model("r5O")
    with pytest.raises(InputError, match=r"did you mean 'vit_t'"):
        get_model("vit_tt")
    with pytest.raises(ValueError, match="mbf_large"):  # InputError is a ValueError; known names are listed
        get_model("resnet")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_features": 64, "embedding_size": 128}, "disagree"),
        ({"num_features": 0}, "positive integer"),
        ({"embedding_size": 1.5}, "positive integer"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"mask_ratio": 0.2}, "mask_ratio"),
    ],
)
def test_bad_arguments_are_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        get_model("r18", **kwargs)


def test_num_features_and_embedding_size_are_synonyms():
    assert get_model("mbf", num_features=32).features.layers[3].num_features == 32
    assert get_model("mbf", embedding_size=32).features.layers[3].num_features == 32
    assert get_model("mbf", num_features=32, embedding_size=32).embedding_size == 32
    assert get_model("r18").fc.out_features == 512


def test_vit_rejects_other_image_sizes():
    model = get_model("vit_t").eval()
    with pytest.raises(InputError, match=r"\[1, 3, 96, 96\]"):
        model(torch.zeros(1, 3, 96, 96))


@pytest.mark.parametrize(
    "name, body, head", [("r18", "layer4", "fc"), ("mbf", "layers.7", "conv_sep"), ("vit_t", "blocks.11.mlp", "norm")]
)
def test_fp16_runs_the_body_in_half_precision_and_the_head_in_float32(name, body, head):
    seen = {}
    reference = _with_fixture_weights(get_model(name, num_features=64)).eval()
    model = get_model(name, num_features=64, fp16=True).eval()
    model.load_state_dict(reference.state_dict())
    model.get_submodule(body).register_forward_hook(lambda m, i, o: seen.__setitem__("body", o.dtype))
    model.get_submodule(head).register_forward_pre_hook(lambda m, i: seen.__setitem__("head", i[0].dtype))
    x = fixtures.fixed_input()
    with torch.no_grad():
        half, full = model(x), reference(x)
    assert seen == {"body": torch.bfloat16, "head": torch.float32}  # CPU autocast is bfloat16
    assert half.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(half, full).min() > 0.98


def _tokens_seen_by_first_block(model, x):
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, i: seen.append(i[0].shape[1]))
    model(x)
    return seen[-1]


@pytest.mark.parametrize("name, kept_in_training", [("vit_t", 129), ("vit_t_dp005_mask0", 144)])
def test_vit_masks_patches_only_in_training(name, kept_in_training):
    model = get_model(name, num_features=32)
    x = fixtures.fixed_input()
    assert _tokens_seen_by_first_block(model.train(), x) == kept_in_training
    with torch.no_grad():
        assert _tokens_seen_by_first_block(model.eval(), x) == 144


def test_vit_masking_fills_in_the_mask_token_and_trains_it():
    model = get_model("vit_t", num_features=32, drop_path_rate=0.0).train()
    model(fixtures.fixed_input()).square().sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()(fixtures.fixed_input()).square().sum().backward()
    assert model.mask_token.grad is None


def test_variant_options_follow_arcface_torch():
    for name, mask, last_rate in [("vit_t", 0.1, 0.1), ("vit_b_dp005_mask_005", 0.05, 0.05), ("vit_h", 0.0, 0.1)]:
        with torch.device("meta"):
            model = get_model(name)
        assert model.mask_ratio == mask
        assert model.blocks[0].drop_path.p == 0.0
        assert model.blocks[-1].drop_path.p == pytest.approx(last_rate)
    assert get_model("vit_t", mask_ratio=0.3).mask_ratio == 0.3
    assert get_model("r18").features.weight.requires_grad is False  # arcface_torch freezes the last BN scale


def test_drop_path_drops_whole_samples_in_training_only():
    layer = DropPath(0.5)
    x = torch.ones(2000, 3, 4)
    out = layer.train()(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6
    assert torch.equal(layer.eval()(x), x)


def test_dropout_is_applied_in_training():
    x = fixtures.fixed_input()
    plain = _with_fixture_weights(get_model("mbf", num_features=16)).train()
    assert torch.equal(plain(x), plain(x))
    dropped = _with_fixture_weights(get_model("mbf", num_features=16, dropout=0.5)).train()
    assert not torch.equal(dropped(x), dropped(x))
    assert get_model("r18", dropout=0.25).dropout.p == 0.25


@pytest.mark.parametrize("name", ["r18", "vit_t"])
def test_checkpointing_leaves_gradients_unchanged(name):
    options = {"drop_path_rate": 0.0, "mask_ratio": 0.0} if name.startswith("vit") else {}
    x = fixtures.fixed_input()
    grads = []
    for using_checkpoint in (False, True):
        model = _with_fixture_weights(get_model(name, num_features=16, using_checkpoint=using_checkpoint, **options))
        model.train()(x).square().sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-4, rtol=1e-4)


def test_register_model_adds_a_name(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model(name="tiny_test_net")
    def tiny(*, num_features: int, dropout: float, fp16: bool):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 112 * 112, num_features))

    assert "tiny_test_net" in list_models()
    assert get_model("tiny_test_net", embedding_size=8)(torch.zeros(1, 3, 112, 112)).shape == (1, 8)
    with pytest.raises(InputError, match="width"):
        get_model("tiny_test_net", width=3)
    with pytest.raises(ValueError, match="twice"):
        register_model(tiny, name="tiny_test_net")
