"""`partial-fc embed`: embeddings of image files, decoded and normalised exactly as in training.

Runs the backbone in torch (``--weights``/``--network``) or an exported model in onnxruntime (``--onnx``), so
the two can be compared. Prints one line per image, or saves the embeddings as an ``.npy`` [N, D] float32.
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np
import torch

from partial_fc.cli.weights import load_backbone, pick_device
from partial_fc.data.decode import decode_rgb, normalize_images
from partial_fc.errors import InputError, MissingInputError
from partial_fc.export import onnx_session, run_onnx
from partial_fc.fileio import atomic_path

IMAGE_SIZE = (112, 112)
SHOWN_VALUES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG/PNG)")
    parser.add_argument("--weights", help="backbone.pth, a checkpoint folder or a checkpoint root")
    parser.add_argument("--network", help="backbone name (r50, mbf, vit_t, ...)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--onnx", metavar="MODEL", help="run this exported .onnx model in onnxruntime instead of torch")
    parser.add_argument("--output", help="save the embeddings here as .npy [N, D] float32 instead of printing them")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def load_images(paths: list[str]) -> torch.Tensor:
    """Decode and normalise ``paths`` into [N, 3, 112, 112] float32 as the training loader does; images of
    another size are resized (said so on stderr). A missing or undecodable file is an error naming it."""
    pixels = np.empty((len(paths), *IMAGE_SIZE, 3), dtype=np.uint8)
    for slot, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise MissingInputError(f"{path}: no such image file") from None
        except OSError as error:
            raise InputError(f"{path}: cannot read: {error.strerror}") from None
        rgb = decode_rgb(data, path)
        if rgb.shape[:2] == IMAGE_SIZE:
            pixels[slot] = rgb
        else:
            print(
                f"{path}: resized from {rgb.shape[1]}x{rgb.shape[0]} to {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}",
                file=sys.stderr,
                flush=True,
            )
            cv2.resize(rgb, (IMAGE_SIZE[1], IMAGE_SIZE[0]), dst=pixels[slot], interpolation=cv2.INTER_LINEAR)
    return normalize_images(torch.from_numpy(pixels)).contiguous()


def embed(images: torch.Tensor, args: argparse.Namespace) -> np.ndarray:
    """Embeddings [N, D] float32 of normalised ``images``, through onnxruntime or the torch backbone."""
    chunks = range(0, images.shape[0], args.batch_size)
    if args.onnx:
        session = onnx_session(args.onnx)
        return np.concatenate([run_onnx(session, images[i : i + args.batch_size]) for i in chunks])
    device = pick_device(args.device)
    model = load_backbone(args.weights, args.network, args.embedding_size).to(device)
    with torch.no_grad():
        return torch.cat([model(images[i : i + args.batch_size].to(device)).float().cpu() for i in chunks]).numpy()


def run(args: argparse.Namespace) -> int:
    if args.onnx and (args.weights or args.network):
        raise InputError("give either --onnx MODEL or --weights and --network, not both")
    if not args.onnx and not (args.weights and args.network):
        raise InputError("give --weights and --network (or --onnx MODEL)")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise MissingInputError(f"{os.path.dirname(os.path.abspath(args.output))}: no such folder for --output")
    embeddings = embed(load_images(args.images), args).astype(np.float32)
    if args.normalize:
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings = embeddings / np.where(norms > 0, norms, 1.0)
    if args.output:
        with atomic_path(args.output) as tmp, open(tmp, "wb") as f:
            np.save(f, embeddings)
        print(f"wrote {args.output}: {embeddings.shape[0]} embeddings of {embeddings.shape[1]} values", flush=True)
        return 0
    for path, vector in zip(args.images, embeddings):
        head = ", ".join(f"{v:+.5f}" for v in vector[:SHOWN_VALUES])
        print(f"{path}: [{head}, ...] norm {np.linalg.norm(vector):.5f}", flush=True)
    return 0
