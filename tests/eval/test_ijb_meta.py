"""IJB release files read back from disk, and each kind of bad input named by file and line (exit status 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from partial_fc.errors import InputError, MissingInputError
from partial_fc.eval.ijb_meta import load_protocol

META = "meta"


def write_release(root: Path) -> Path:
    """A hand-built IJB-C release: 4 images (templates 1, 2, 3; template 1 has two medias), 3 pairs, 1:N CSVs."""
    import cv2

    (root / META).mkdir(parents=True)
    (root / "loose_crop").mkdir()
    rng = np.random.default_rng(0)
    points = "38.3 51.7 73.5 51.5 56.0 71.7 41.5 92.4 70.7 92.2"
    for i in range(1, 5):
        cv2.imwrite(str(root / "loose_crop" / f"{i}.jpg"), rng.integers(0, 255, (120, 120, 3), dtype=np.uint8))
    (root / META / "ijbc_name_5pts_score.txt").write_text("".join(f"{i}.jpg {points} 0.9\n" for i in range(1, 5)))
    (root / META / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 10\n2.jpg 1 11\n3.jpg 2 12\n4.jpg 3 13\n")
    (root / META / "ijbc_template_pair_label.txt").write_text("1 2 1\n1 3 0\n2 3 0\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    (root / META / "ijbc_1N_gallery_G1.csv").write_text(header + "1,100,1.jpg\n1,100,2.jpg\n")
    (root / META / "ijbc_1N_gallery_G2.csv").write_text(header + "3,300,4.jpg\n")
    (root / META / "ijbc_1N_probe_mixed.csv").write_text(header + "2,100,3.jpg\n")
    return root


def test_a_release_reads_back(tmp_path):
    protocol = load_protocol(write_release(tmp_path), "IJBC")
    images = protocol.images
    assert images.names == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    assert images.templates.tolist() == [1, 1, 2, 3] and images.medias.tolist() == [10, 11, 12, 13]
    assert images.landmarks.shape == (4, 5, 2) and images.faceness.tolist() == pytest.approx([0.9] * 4)
    assert protocol.pairs.first.tolist() == [1, 1, 2] and protocol.pairs.same.tolist() == [True, False, False]
    assert [g.name for g in protocol.galleries] == ["G1", "G2"]
    assert protocol.galleries[0].templates.tolist() == [1] and protocol.galleries[0].subjects.tolist() == [100]
    assert protocol.probes.templates.tolist() == [2]


def test_without_the_1n_csvs_only_1to1_is_scored(tmp_path):
    root = write_release(tmp_path)
    for name in ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv"):
        (root / META / name).unlink()
    assert load_protocol(root).probes is None


@pytest.mark.parametrize(
    "file_name, content, expected",
    [
        ("ijbc_template_pair_label.txt", "1 2 1\n1 3 0\n2 3", "ijbc_template_pair_label.txt:3: expected 3 columns"),
        ("ijbc_template_pair_label.txt", "1 2 1\n1 x 0\n", "ijbc_template_pair_label.txt:2: value 'x' is not a number"),
        ("ijbc_template_pair_label.txt", "1 2 1\n1 7 0\n", "ijbc_template_pair_label.txt:2: template 7 has no images"),
        (
            "ijbc_face_tid_mid.txt",
            "1.jpg 1 10\n2.jpg 1\n3.jpg 2 12\n4.jpg 3 13\n",
            "ijbc_face_tid_mid.txt:2: expected 3",
        ),
        (
            "ijbc_face_tid_mid.txt",
            "1.jpg 1 10\n2.jpg one 11\n3.jpg 2 12\n4.jpg 3 13\n",
            "ijbc_face_tid_mid.txt:2: id 'one'",
        ),
        ("ijbc_name_5pts_score.txt", "1.jpg 1 2 3\n", "ijbc_name_5pts_score.txt:1: expected 12 columns"),
        (
            "ijbc_1N_gallery_G1.csv",
            "TEMPLATE_ID,FILENAME\n1,1.jpg\n",
            "ijbc_1N_gallery_G1.csv:1: missing column SUBJECT_ID",
        ),
        (
            "ijbc_1N_probe_mixed.csv",
            "TEMPLATE_ID,SUBJECT_ID\n9,100\n",
            "ijbc_1N_probe_mixed.csv: template 9 has no images",
        ),
    ],
)
def test_bad_meta_is_named_by_file_and_line(tmp_path, file_name, content, expected):
    root = write_release(tmp_path)
    (root / META / file_name).write_text(content)
    with pytest.raises(InputError, match=expected.replace(".", r"\.")):
        load_protocol(root)


def test_a_missing_meta_file_is_named(tmp_path):
    root = write_release(tmp_path)
    (root / META / "ijbc_face_tid_mid.txt").unlink()
    with pytest.raises(MissingInputError, match="ijbc_face_tid_mid.txt: no such file"):
        load_protocol(root)


@pytest.fixture
def weights(tmp_path):
    from partial_fc.backbones import get_model

    torch.save(get_model("plain_nano", num_features=8).state_dict(), tmp_path / "w.pth")
    return tmp_path / "w.pth"


def run_eval(root: Path, weights: Path, output: Path) -> int:
    from partial_fc.cli.main import main

    return main(
        [
            "eval-ijb",
            str(root),
            "--weights",
            str(weights),
            "--network",
            "plain_nano",
            "--embedding-size",
            "8",
            "--output",
            str(output),
        ]
    )


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda root: (root / "loose_crop" / "3.jpg").write_bytes(b"\xff\xd8 not a jpeg"), "3.jpg"),
        (lambda root: (root / "loose_crop" / "4.jpg").unlink(), "4.jpg: no such image (line 4 of"),
        (
            lambda root: (root / META / "ijbc_template_pair_label.txt").write_text("1 2 1\n1 3"),
            "label.txt:2: expected 3",
        ),
    ],
)
def test_the_command_names_bad_inputs_and_exits_2(tmp_path, weights, capsys, damage, expected):
    root = write_release(tmp_path / "IJBC")
    assert run_eval(root, weights, tmp_path / "out") == 0
    damage(root)
    assert run_eval(root, weights, tmp_path / "out2") == 2
    err = capsys.readouterr().err
    assert "partial-fc: error:" in err and expected in err and "Traceback" not in err
