"""Five-point alignment: the similarity fit against an independent least-squares solve, the crop, and
`partial-fc align`."""

import json
import math
import os

import cv2
import numpy as np
import pytest

from partial_fc.data.align import ARCFACE_DST, alignment_matrix, destination_points, norm_crop, similarity_transform
from partial_fc.data.landmark_file import format_landmark_line
from partial_fc.data.synthetic import render_identity_image
from partial_fc.errors import InputError
from tests.cli_helpers import assert_one_error, call


def least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: x' = a x - b y + tx, y' = b x + a y + ty solved for (a, b, tx, ty) with numpy's lstsq."""
    rows = []
    for x, y in src:
        rows += [[x, -y, 1.0, 0.0], [y, x, 0.0, 1.0]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.asarray(dst, np.float64).reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def similarity(angle_degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """The 2x3 matrix of a rotation by `angle_degrees` and `scale` about the origin, then `shift`."""
    c, s = math.cos(math.radians(angle_degrees)) * scale, math.sin(math.radians(angle_degrees)) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def test_fit_equals_an_independent_least_squares_solve():
    rng = np.random.default_rng(7)
    for _ in range(50):
        src = rng.uniform(0, 400, size=(5, 2))
        dst = rng.uniform(0, 112, size=(5, 2))
        np.testing.assert_allclose(similarity_transform(src, dst), least_squares_similarity(src, dst), atol=1e-4)
        landmarks = apply(
            similarity(rng.uniform(-60, 60), rng.uniform(0.5, 3), rng.uniform(-50, 50, 2)), ARCFACE_DST
        ) + rng.normal(0, 2, (5, 2))
        np.testing.assert_allclose(
            alignment_matrix(landmarks), least_squares_similarity(landmarks, ARCFACE_DST), atol=1e-4
        )
    mirrored = ARCFACE_DST * [-1.0, 1.0] + [112.0, 0.0]  # best fitted by a reflection, which is not allowed
    np.testing.assert_allclose(
        similarity_transform(ARCFACE_DST, mirrored), least_squares_similarity(ARCFACE_DST, mirrored), atol=1e-4
    )


@pytest.mark.parametrize("size", [112, 224, 128, 256])
def test_noise_free_landmarks_land_exactly_on_the_template(size):
    landmarks = apply(similarity(-23.0, 1.7, (40.0, 95.0)), ARCFACE_DST)
    np.testing.assert_allclose(apply(alignment_matrix(landmarks, size), landmarks), destination_points(size), atol=1e-9)


def test_template_scales_as_insightface():
    np.testing.assert_array_equal(destination_points(112), ARCFACE_DST)
    np.testing.assert_allclose(destination_points(224), ARCFACE_DST * 2, atol=1e-5)
    np.testing.assert_allclose(destination_points(128), ARCFACE_DST + [8.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(destination_points(256), ARCFACE_DST * 2 + [16.0, 0.0], atol=1e-5)


def test_a_warped_face_aligned_back_matches_the_original():
    face = render_identity_image(0, 5, 0)
    placement = similarity(28.0, 1.5, (0.0, 0.0))
    placement[:, 2] = [150.0, 140.0] - placement[:, :2] @ [56.0, 56.0]
    loose = cv2.warpAffine(face, placement, (300, 300), flags=cv2.INTER_LINEAR)
    aligned = norm_crop(loose, apply(placement, ARCFACE_DST))
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    difference = np.abs(aligned.astype(np.float64) - face)[4:-4, 4:-4]
    assert difference.mean() < 3.0, difference.mean()
    assert np.abs(cv2.resize(loose, (112, 112)).astype(np.float64) - face).mean() > 20.0  # alignment mattered


def test_outside_the_image_is_black():
    face = render_identity_image(0, 5, 0)
    aligned = norm_crop(face, ARCFACE_DST * 4.0 - 168.0)  # shrunk 4x: the image covers the middle 28 x 28 only
    assert (aligned[:40] == 0).all() and (aligned[:, 72:] == 0).all() and aligned[56, 56].any()


@pytest.mark.parametrize(
    "landmarks, message",
    [
        (np.zeros((4, 2)), "shape"),
        (np.zeros(10), "shape"),
        ([[1, 2]] * 5 + [[3, 4]], "shape"),
        (np.array([[np.nan, 1.0]] * 5), "finite"),
        (np.array([[np.inf, 1.0]] * 5), "finite"),
        ([["a", "b"]] * 5, "numbers"),
        (None, "shape"),
        (np.full((5, 2), 30.0), "degenerate"),
    ],
)
def test_bad_landmarks_are_clear_errors(landmarks, message):
    with pytest.raises(InputError, match=message):
        norm_crop(np.zeros((50, 50, 3), np.uint8), landmarks)


def test_bad_sizes_and_images_are_clear_errors():
    with pytest.raises(InputError, match="multiple of 112 or 128"):
        norm_crop(np.zeros((50, 50, 3), np.uint8), ARCFACE_DST, size=100)
    with pytest.raises(InputError, match="H x W x 3"):
        norm_crop(np.zeros((50, 50), np.uint8), ARCFACE_DST)


# ----------------------------------------------------------------------------------------------------------------
# partial-fc align


def make_loose_folder(root, count: int = 10) -> tuple[list[str], dict]:
    """`count` faces placed by known similarities, half JPEG and half PNG in two sub-folders; the landmark lines
    and {relative path: (BGR loose image, landmarks)}."""
    lines, truth = [], {}
    for n in range(count):
        face = render_identity_image(0, n, 1)[:, :, ::-1]
        placement = similarity(10.0 * n - 40.0, 1.0 + 0.1 * n, (0.0, 0.0))
        placement[:, 2] = [100.0 + n, 90.0] - placement[:, :2] @ [56.0, 56.0]
        loose = cv2.warpAffine(face, placement, (200, 190))
        relative = f"{'jpeg' if n % 2 else 'png'}/{n}.{'jpg' if n % 2 else 'png'}"
        os.makedirs(root / os.path.dirname(relative), exist_ok=True)
        cv2.imwrite(str(root / relative), loose)
        landmarks = apply(placement, ARCFACE_DST)
        truth[relative] = (cv2.imread(str(root / relative)), landmarks)
        lines.append(format_landmark_line(relative, landmarks, 0.9))
    return lines, truth


def files_under(folder) -> dict:
    return {
        os.path.relpath(os.path.join(path, name), folder): open(os.path.join(path, name), "rb").read()
        for path, _, names in os.walk(folder)
        for name in names
    }


def test_align_cli_writes_the_crops_serial_and_parallel_alike(tmp_path, capsys):
    root = tmp_path / "loose"
    lines, truth = make_loose_folder(root)
    (tmp_path / "lmk.txt").write_text("\n".join(lines) + "\n\n")
    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"aligned_{workers}"
        status, stdout, _ = call(
            capsys, "align", str(root), str(tmp_path / "lmk.txt"), str(out), "--workers", workers, "--quiet"
        )
        summary = json.loads(stdout)
        assert status == 0 and summary["job"] == "align" and summary["images"] == 10 and summary["bad"] == 0
        outputs[workers] = files_under(out)
    assert outputs["1"] == outputs["2"] and sorted(outputs["1"]) == sorted(truth)
    for relative, (loose, landmarks) in truth.items():
        aligned = cv2.imread(str(tmp_path / "aligned_1" / relative))
        assert aligned.shape == (112, 112, 3)
        if relative.endswith(".png"):  # lossless: exactly norm_crop's pixels
            np.testing.assert_array_equal(aligned, norm_crop(loose, landmarks))
    status, stdout, _ = call(
        capsys,
        "align",
        str(root),
        str(tmp_path / "lmk.txt"),
        str(tmp_path / "big"),
        "--size",
        "224",
        "--workers",
        "1",
        "--quiet",
    )
    assert status == 0 and cv2.imread(str(tmp_path / "big" / "png/0.png")).shape == (224, 224, 3)


def test_align_cli_names_each_bad_input_or_skips_it(tmp_path, capsys):
    root = tmp_path / "loose"
    lines, _ = make_loose_folder(root, count=4)
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "png/extra.png").write_bytes((root / "png/0.png").read_bytes())
    bad = {
        "missing": format_landmark_line("png/missing.png", ARCFACE_DST, 1.0),
        "broken": format_landmark_line("broken.jpg", ARCFACE_DST, 1.0),
        "short": "jpeg/1.jpg 1 2 3 4 5 6 7 8 9",
        "escape": format_landmark_line("../outside.jpg", ARCFACE_DST, 1.0),
        "degenerate": format_landmark_line("png/extra.png", np.full((5, 2), 7.0), 1.0),
        "extension": format_landmark_line("png/0.bmp", ARCFACE_DST, 1.0),
    }
    expected = {
        "missing": "missing.png",
        "broken": "cannot decode",
        "short": "11 or 12 fields",
        "escape": "relative",
        "degenerate": "degenerate",
        "extension": "JPEG or PNG",
    }
    landmark_file = tmp_path / "lmk.txt"
    for name, line in bad.items():
        landmark_file.write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n")
        status, _, err = call(
            capsys, "align", str(root), str(landmark_file), str(tmp_path / "out"), "--workers", "2", "--quiet"
        )
        assert_one_error(status, err, str(landmark_file), "line 3", expected[name])
    landmark_file.write_text("\n".join(lines + [bad["missing"], bad["broken"], bad["short"], lines[0]]) + "\n")
    status, stdout, _ = call(
        capsys, "align", str(root), str(landmark_file), str(tmp_path / "skipped"), "--skip-bad", "--quiet"
    )
    summary = json.loads(stdout)
    assert status == 0 and summary["images"] == 4 and summary["bad"] == 4, summary
    assert any("already listed on line 1" in line for line in summary["bad_lines"])
    assert sorted(files_under(tmp_path / "skipped")) == sorted(line.split()[0] for line in lines)  # no temporary files
    status, _, err = call(capsys, "align", str(root), str(tmp_path / "none.txt"), str(tmp_path / "out"), "--quiet")
    assert_one_error(status, err, "none.txt")
    (tmp_path / "taken").write_text("a file where the output folder should be")
    landmark_file.write_text("\n".join(lines) + "\n")
    status, _, err = call(capsys, "align", str(root), str(landmark_file), str(tmp_path / "taken"), "--quiet")
    assert_one_error(status, err, "taken")
