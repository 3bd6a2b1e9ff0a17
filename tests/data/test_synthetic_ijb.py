"""`make-synthetic --ijb`: a consistent IJB-C-format set of unseen generated identities that alignment recovers."""

import csv
import hashlib
import json
import os
from collections import defaultdict

import cv2
import numpy as np
import pytest

from partial_fc.data.align import norm_crop
from partial_fc.data.landmark_file import read_landmark_file
from partial_fc.data.synthetic import render_identity_image
from partial_fc.data.synthetic_ijb import IJB_FIRST_IDENTITY, ijb_plan, write_synthetic_ijb
from partial_fc.errors import InputError
from tests.cli_helpers import assert_one_error, call

SHAPE = dict(identities=9, templates_per_identity=3, medias_per_template=2, images_per_media=2)


@pytest.fixture(scope="module")
def ijb(tmp_path_factory):
    out = tmp_path_factory.mktemp("ijb") / "IJBC"
    return out, write_synthetic_ijb(out, **SHAPE, seed=3)


def read_protocol(path) -> list[dict]:
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0])[:3] == ["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"]
    return rows


def digest(folder) -> str:
    hashes = hashlib.sha256()
    for path, dirs, names in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(names):
            hashes.update(name.encode() + open(os.path.join(path, name), "rb").read())
    return hashes.hexdigest()


def test_the_set_is_consistent(ijb):
    out, summary = ijb
    files = summary["files"]
    assert summary["images"] == 9 * 3 * 2 * 2 and summary["templates"] == 27 and summary["medias"] == 54
    media_rows = [line.split() for line in open(files["face_tid_mid"]).read().splitlines()]
    template_of = {name: int(template) for name, template, _ in media_rows}
    assert all((out / "loose_crop" / name).is_file() for name in template_of)
    assert len(template_of) == len(media_rows) == summary["images"]
    medias = defaultdict(set)
    images = defaultdict(int)
    for _, template, media in media_rows:
        medias[int(template)].add(int(media))
        images[int(media)] += 1
    assert min(map(len, medias.values())) >= 2 and min(images.values()) >= 2

    entries, bad = read_landmark_file(files["name_5pts_score"])
    assert not bad and [entry.path for entry in entries] == [row[0] for row in media_rows]
    assert all(0.0 < entry.faceness <= 1.0 for entry in entries)

    subject_of_template = {image.template: image.subject for image in ijb_plan(**SHAPE)}
    assert min(subject_of_template.values()) >= IJB_FIRST_IDENTITY  # never a training identity
    pairs = [tuple(map(int, line.split())) for line in open(files["template_pair_label"]).read().splitlines()]
    assert {label for _, _, label in pairs} == {0, 1} and len(set(pairs)) == len(pairs)
    for one, other, label in pairs:
        assert one in medias and other in medias and one != other
        assert (subject_of_template[one] == subject_of_template[other]) == bool(label)
    assert summary["genuine_pairs"] == 9 * 3 and summary["impostor_pairs"] == 4 * 27

    galleries = {name: read_protocol(files[f"gallery_{name}"]) for name in ("G1", "G2")}
    probes = read_protocol(files["probe_mixed"])
    subjects = {name: {int(row["SUBJECT_ID"]) for row in rows} for name, rows in galleries.items()}
    assert subjects["G1"] and subjects["G2"] and not subjects["G1"] & subjects["G2"]
    probe_subjects = {int(row["SUBJECT_ID"]) for row in probes}
    assert probe_subjects - subjects["G1"] - subjects["G2"] and probe_subjects & subjects["G1"]
    gallery_templates = {int(row["TEMPLATE_ID"]) for rows in galleries.values() for row in rows}
    assert not gallery_templates & {int(row["TEMPLATE_ID"]) for row in probes}
    for row in [row for rows in galleries.values() for row in rows] + probes:
        assert template_of[row["FILENAME"]] == int(row["TEMPLATE_ID"])
        assert subject_of_template[int(row["TEMPLATE_ID"])] == int(row["SUBJECT_ID"])
    assert summary["unmated_probe_templates"] > 0


def test_aligning_the_loose_crops_recovers_the_canonical_faces(ijb):
    out, summary = ijb
    entries, _ = read_landmark_file(summary["files"]["name_5pts_score"])
    plan = {image.name: image for image in ijb_plan(**SHAPE)}
    aligned_error, unaligned_error = [], []
    for entry in entries[::3]:
        loose = cv2.imread(str(out / "loose_crop" / entry.path))
        assert loose.shape[0] > 112
        image = plan[entry.path]
        canonical = render_identity_image(3, image.subject, image.index)[:, :, ::-1].astype(np.float64)
        aligned_error.append(np.abs(norm_crop(loose, entry.landmarks) - canonical).mean())
        unaligned_error.append(np.abs(cv2.resize(loose, (112, 112)) - canonical).mean())
    assert np.mean(aligned_error) < 10.0 and max(aligned_error) < 25.0, aligned_error
    assert min(unaligned_error) > 2 * max(aligned_error), (unaligned_error, aligned_error)


def test_deterministic_for_a_seed(ijb, tmp_path):
    out, _ = ijb
    small = dict(identities=3, templates_per_identity=2, medias_per_template=1, images_per_media=2)
    write_synthetic_ijb(tmp_path / "a", **small, seed=3)
    write_synthetic_ijb(tmp_path / "b", **small, seed=3)
    write_synthetic_ijb(tmp_path / "c", **small, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_make_synthetic_ijb_cli_and_align_on_it(tmp_path, capsys):
    out = tmp_path / "IJBC"
    status, stdout, _ = call(
        capsys,
        "make-synthetic",
        "--ijb",
        str(out),
        "--identities",
        "3",
        "--templates-per-id",
        "2",
        "--medias-per-template",
        "1",
        "--images-per-media",
        "2",
        "--seed",
        "1",
    )
    summary = json.loads(stdout)
    assert status == 0 and summary["job"] == "make-synthetic" and summary["images"] == 12
    status, stdout, _ = call(
        capsys,
        "align",
        str(out / "loose_crop"),
        str(out / "meta/ijbc_name_5pts_score.txt"),
        str(tmp_path / "aligned"),
        "--workers",
        "2",
        "--quiet",
    )
    assert status == 0 and json.loads(stdout)["images"] == 12
    assert cv2.imread(str(tmp_path / "aligned" / "1.jpg")).shape == (112, 112, 3)
    status, _, err = call(capsys, "make-synthetic", "--ijb", str(out), "--identities", "2")
    assert_one_error(status, err, "at least 3 identities")
    status, _, err = call(capsys, "make-synthetic", "--identities", "3")
    assert_one_error(status, err, "--out")


def test_too_small_sets_are_refused(tmp_path):
    with pytest.raises(InputError, match="2 templates"):
        write_synthetic_ijb(tmp_path, identities=3, templates_per_identity=1)
