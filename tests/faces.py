"""Small real face sets for data tests: rendered identities, JPEG-encoded, written with FaceSetWriter."""

from __future__ import annotations

from pathlib import Path

import cv2

from partial_fc.data.faceset import FaceSetWriter
from partial_fc.data.synthetic import render_identity_image


def face_jpeg(identity: int, index: int, size: int) -> bytes:
    """JPEG bytes of image `index` of the rendered `identity`, `size` pixels square."""
    rgb = render_identity_image(0, identity, index, size=size)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def write_faceset(root: Path, identities: int, per_identity: int, size: int) -> Path:
    """An insightface-layout `.rec`/`.idx` set in `root` (header key 0, images, identity records)."""
    with FaceSetWriter(root, image_size=(size, size)) as writer:
        for identity in range(identities):
            for index in range(per_identity):
                writer.write(identity, face_jpeg(identity, index, size))
    return root
