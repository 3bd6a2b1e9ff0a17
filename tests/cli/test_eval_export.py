"""`partial-fc eval`, `export` and `embed`, the exact ROC curve and the ONNX export, on real files."""

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from partial_fc.data.binfile import load_bin
from partial_fc.data.synthetic import encode_jpeg, render_identity_image, write_synthetic_set
from partial_fc.eval.roc import atomic_path, plot_roc, roc_curve
from partial_fc.eval.verification import evaluate_model, tar_at_far
from partial_fc.export import OnnxMismatchError, check_onnx, export_onnx, onnx_session, run_onnx
from tests.cli_helpers import assert_one_error, call
from tests.launchers import REPO

NETWORK, DIM = "mbf", 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "partial_fc", *arguments], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def reference_images(paths: list[Path]) -> torch.Tensor:
    """Decoded independently of partial_fc: cv2 to RGB, resized to 112x112, (x/255 - 0.5)/0.5."""
    images = []
    for path in paths:
        rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if rgb.shape[:2] != (112, 112):
            rgb = cv2.resize(rgb, (112, 112), interpolation=cv2.INTER_LINEAR)
        images.append((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5)
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())


class TinyNet(nn.Module):
    """A small backbone-shaped net (conv, BN, PReLU, flatten, linear, BN1d) for the export unit tests."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.BatchNorm2d(8), nn.PReLU(8), nn.AdaptiveAvgPool2d(7))
        self.fc = nn.Linear(8 * 49, dim)
        self.features = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.body(x), 1)))


# ---------------------------------------------------------------------------------------------------------------
# ROC curve and plot


def test_roc_curve_equals_brute_force_and_tar_at_far():
    rng = np.random.default_rng(3)
    issame = rng.random(500) < 0.4
    dist = np.round(np.where(issame, rng.normal(0.8, 0.3, 500), rng.normal(1.6, 0.3, 500)), 2)  # with ties
    curve = roc_curve(dist, issame)
    pos, neg = dist[issame], dist[~issame]
    expected_thresholds = sorted(set(dist.tolist())) + [np.inf]
    assert curve.thresholds.tolist() == expected_thresholds
    for far, tar, t in zip(curve.far, curve.tar, curve.thresholds):
        assert far == np.mean(neg < t) and tar == np.mean(pos < t)
    assert (curve.far[0], curve.tar[0], curve.far[-1], curve.tar[-1]) == (0, 0, 1, 1)
    points = set(zip(curve.far.tolist(), curve.tar.tolist()))
    for t in rng.uniform(-0.5, 3.5, 200):  # any threshold at all gives one of the curve's points
        assert (np.mean(neg < t), np.mean(pos < t)) in points
    for far in (1e-3, 0.01, 0.05, 0.3):  # the best TAR at FAR <= far is tar_at_far's
        assert curve.tar[curve.far <= far].max() == tar_at_far(dist, issame, far).tar


def test_roc_curve_refuses_bad_input():
    with pytest.raises(ValueError, match="positive and negative"):
        roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="3 distances but 2"):
        roc_curve([0.1, 0.2, 0.3], [True, False])


def test_plot_roc_writes_a_png_atomically(tmp_path):
    rng = np.random.default_rng(0)
    issame = np.arange(2000) % 2 == 0
    dist = np.where(issame, rng.normal(0.8, 0.3, 2000), rng.normal(1.6, 0.3, 2000))
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")
    plot_roc({"a": roc_curve(dist, issame), "b": roc_curve(dist[::-1], issame)}, target, title="t")
    assert png_size(target) == (640, 480)
    assert os.listdir(tmp_path) == ["roc.png"]  # no temporary file left behind


def test_atomic_path_leaves_the_target_alone_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"before")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"before" and os.listdir(tmp_path) == ["out.bin"]


# ---------------------------------------------------------------------------------------------------------------
# ONNX export on a small module


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_matches_torch_at_batch_1_and_5(tmp_path, exporter):
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a dropped BN would show
        model.features.running_mean.uniform_(-1, 1)
        model.features.running_var.uniform_(0.5, 2)
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path, exporter=exporter)
    session = onnx_session(path)
    assert session.get_inputs()[0].shape[1:] == [3, 112, 112] and isinstance(session.get_inputs()[0].shape[0], str)
    for batch in (1, 5):
        images = torch.rand(batch, 3, 112, 112) * 2 - 1
        with torch.no_grad():
            expected = model(images).numpy()
        got = run_onnx(session, images)
        assert got.shape == (batch, 16) and np.abs(expected).max() > 0.1 and np.abs(got - expected).max() <= 1e-4
    assert check_onnx(model, path, batch_sizes=(1, 5)) <= 1e-4
    assert os.listdir(tmp_path) == ["tiny.onnx"]


def test_check_onnx_reports_the_difference(tmp_path):
    model = TinyNet().eval()
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path, exporter="torchscript")
    with torch.no_grad():
        model.fc.bias.add_(0.5)
    with pytest.raises(OnnxMismatchError, match=r"tiny.onnx: onnxruntime differs from torch by 0\.5") as info:
        check_onnx(model, path)
    assert info.value.max_error == pytest.approx(0.5, rel=1e-3)


def test_onnx_session_names_a_bad_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="bad.onnx: not a loadable ONNX model"):
        onnx_session(bad)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        onnx_session(tmp_path / "missing.onnx")


# ---------------------------------------------------------------------------------------------------------------
# The commands, on a small real backbone


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """backbone.pth of a randomly initialised mbf (64-d), a synthetic .bin of 20 pairs, a pair list of 10 pairs
    with its image folder, and three image files (one PNG, one of another size)."""
    from partial_fc.backbones import get_model

    root = tmp_path_factory.mktemp("eval_export")
    torch.manual_seed(0)
    model = get_model(NETWORK, num_features=DIM)
    for module in model.modules():  # BN statistics of real activations: embeddings of norm ~10, not ~1e-5
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 112, 112) * 2 - 1)
    torch.save(model.state_dict(), root / "backbone.pth")
    write_synthetic_set(str(root / "set"), 2, 2, 10, 20, seed=1, workers=1, progress=False)
    lines = []
    for pair in range(10):  # a pair list: same identity on even pairs, two identities on odd ones
        first, second = (pair, pair) if pair % 2 == 0 else (pair, pair + 100)
        for identity, index in ((first, 0), (second, 1)):
            name = f"id{identity}_{index}.jpg"
            (root / "faces").mkdir(exist_ok=True)
            (root / "faces" / name).write_bytes(encode_jpeg(render_identity_image(7, identity, index)))
        lines.append(f"id{first}_0.jpg id{second}_1.jpg {1 - pair % 2}\n")
    (root / "pairs.txt").write_text("".join(lines))
    images = []
    for index, size in enumerate((112, 112, 96)):
        rgb = render_identity_image(5, index, 0, size)
        path = root / f"face{index}.{'png' if index == 1 else 'jpg'}"
        if index == 1:
            cv2.imwrite(str(path), rgb[:, :, ::-1])
        else:
            path.write_bytes(encode_jpeg(rgb))
        images.append(path)
    return {
        "root": root,
        "weights": root / "backbone.pth",
        "bin": root / "set" / "synthetic.bin",
        "pairs": f"{root / 'pairs.txt'}:{root / 'faces'}",
        "images": images,
    }


def _weights_args(weights, network=NETWORK, dim=DIM):
    return ["--weights", str(weights), "--network", network, "--embedding-size", str(dim)]


def loaded_model(files) -> nn.Module:
    from partial_fc.cli.weights import load_backbone

    return load_backbone(str(files["weights"]), NETWORK, DIM)


@pytest.mark.slow
def test_eval_reports_the_verification_numbers_and_a_roc_png(files, tmp_path):
    result = run_cli(
        "eval",
        *_weights_args(files["weights"]),
        "--bin",
        str(files["bin"]),
        "--roc-dir",
        str(tmp_path / "roc"),
        "--json",
    )
    (entry,) = [json.loads(line) for line in result.stdout.splitlines()]
    images, issame = load_bin(files["bin"])
    expected = evaluate_model(loaded_model(files), images, issame, fars=(1e-4, 1e-3))
    assert entry["pairs"] == 20 and entry["negative_pairs"] == issame.count(False) == 10
    assert entry["accuracy"] == pytest.approx(expected.accuracy, abs=1e-12)
    assert entry["accuracy_std"] == pytest.approx(expected.accuracy_std, abs=1e-12)
    assert entry["threshold"] == pytest.approx(expected.threshold)
    assert entry["xnorm"] == pytest.approx(expected.xnorm, rel=1e-5) and entry["xnorm"] > 1
    for far, point in expected.tar_at_far.items():
        got = entry["tar_at_far"][f"{far:.0e}"]
        assert got["tar"] == pytest.approx(point.tar) and got["resolvable"] is False  # 10 negatives
    assert 0.0 <= entry["accuracy"] <= 1.0 and len(entry["fold_accuracies"]) == 10
    assert entry["roc"] == str(tmp_path / "roc" / "synthetic_roc.png")
    assert png_size(Path(entry["roc"])) == (640, 480)


def test_eval_text_output_on_a_pair_list(files, tmp_path, capsys):
    status, out, _ = call(
        capsys,
        "eval",
        *_weights_args(files["weights"]),
        "--pairs",
        files["pairs"],
        "--batch-size",
        "8",
        "--roc-dir",
        str(tmp_path),
    )
    assert status == 0
    assert out.startswith(f"pairs ({files['root'] / 'pairs.txt'}): 10 pairs, 5 same, 5 different")
    assert "accuracy " in out and "±" in out and "(10 folds, with flip)" in out and "xnorm" in out
    assert out.count("below 1/5 negative pairs: no false accept allowed") == 2
    assert png_size(tmp_path / "pairs_roc.png") == (640, 480)


@pytest.mark.slow
def test_export_and_embed_agree_with_torch_and_onnxruntime(files, tmp_path, capsys):
    onnx_path = tmp_path / "model.onnx"
    result = run_cli("export", *_weights_args(files["weights"]), "--output", str(onnx_path))
    assert "max abs difference" in result.stdout
    model = loaded_model(files)
    session = onnx_session(onnx_path)
    for batch in (1, 5):
        images = torch.rand(batch, 3, 112, 112) * 2 - 1
        with torch.no_grad():
            expected = model(images).numpy()
        assert np.abs(expected).max() > 0.1 and np.abs(run_onnx(session, images) - expected).max() <= 1e-4

    paths = [str(p) for p in files["images"]]
    with torch.no_grad():
        reference = model(reference_images(files["images"])).numpy()
    assert np.linalg.norm(reference, axis=1).min() > 1.0  # the 1e-4 comparisons below are not vacuous
    common = ["--batch-size", "2", "--output"]
    status, _, torch_err = call(
        capsys, "embed", *_weights_args(files["weights"]), *paths, *common, str(tmp_path / "torch.npy")
    )
    assert status == 0 and "face2.jpg: resized from 96x96 to 112x112" in torch_err
    status, _, onnx_err = call(capsys, "embed", "--onnx", str(onnx_path), *paths, *common, str(tmp_path / "onnx.npy"))
    assert status == 0 and "face2.jpg: resized" in onnx_err
    from_torch, from_onnx = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "onnx.npy")
    assert from_torch.shape == from_onnx.shape == (3, DIM) and from_torch.dtype == np.float32
    assert np.abs(from_torch - reference).max() <= 1e-4
    assert np.abs(from_onnx - run_onnx(session, reference_images(files["images"]))).max() <= 1e-4
    assert np.abs(from_onnx - from_torch).max() <= 1e-4


def test_embed_prints_one_line_per_image_and_normalizes(files, capsys):
    paths = [str(p) for p in files["images"]]
    status, out, _ = call(capsys, "embed", *_weights_args(files["weights"]), "--normalize", *paths)
    lines = out.splitlines()
    assert status == 0 and len(lines) == 3
    for path, line in zip(paths, lines):
        assert line.startswith(f"{path}: [") and line.endswith("norm 1.00000")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, the file named


def test_bad_weights_are_named(files, tmp_path, capsys):
    images = [str(p) for p in files["images"][:1]]
    missing = tmp_path / "missing.pth"
    status, _, err = call(capsys, "embed", *_weights_args(missing), *images)
    assert_one_error(status, err, "missing.pth")

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(files["weights"].read_bytes()[:1000])
    status, _, err = call(capsys, "export", *_weights_args(corrupt), "--output", str(tmp_path / "m.onnx"))
    assert_one_error(status, err, "corrupt.pth")
    assert not (tmp_path / "m.onnx").exists()

    state = torch.load(files["weights"])
    renamed = {("renamed." + k if i < 7 else k): v for i, (k, v) in enumerate(state.items())}
    torch.save(renamed, tmp_path / "renamed.pth")
    status, _, err = call(capsys, "eval", *_weights_args(tmp_path / "renamed.pth"), "--bin", str(files["bin"]))
    assert_one_error(status, err, "renamed.pth", "missing 7 key(s)", "unexpected 7 key(s)", "(2 more)")

    status, _, err = call(capsys, "embed", *_weights_args(files["weights"], dim=128), *images)
    assert_one_error(status, err, "backbone.pth", "another shape", "embedding size looks like 64")


def test_unknown_network_suggests_the_nearest(files, capsys):
    status, _, err = call(capsys, "export", *_weights_args(files["weights"], network="mbff"), "--output", "x.onnx")
    assert_one_error(status, err, "'mbff'", "did you mean 'mbf'")


def test_bad_images_and_sets_are_named(files, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    paths = [str(files["images"][0]), str(broken)]
    status, _, err = call(capsys, "embed", *_weights_args(files["weights"]), *paths)
    assert_one_error(status, err, "broken.jpg")
    status, _, err = call(capsys, "embed", *_weights_args(files["weights"]), str(tmp_path / "absent.png"))
    assert_one_error(status, err, "absent.png")

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(files["bin"].read_bytes()[:5000])
    status, _, err = call(capsys, "eval", *_weights_args(files["weights"]), "--bin", str(truncated))
    assert_one_error(status, err, "truncated.bin")
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps((os.system, ("true",))))
    status, _, err = call(capsys, "eval", *_weights_args(files["weights"]), "--bin", str(evil))
    assert_one_error(status, err, "evil.bin")
    status, _, err = call(capsys, "eval", *_weights_args(files["weights"]), "--bin", str(tmp_path / "nope.bin"))
    assert_one_error(status, err, "nope.bin")
    status, _, err = call(capsys, "embed", "--onnx", str(broken), paths[0])
    assert_one_error(status, err, "broken.jpg", "ONNX")
