"""IJB-B / IJB-C scoring as insightface's ``eval_ijbc.py`` and ``ijb_evals.py`` (PR #1739) compute it.

Templates: each image's feature (embedding plus flip embedding, times the faceness score unless switched off) is
averaged within its media, the media are summed, and the sum is L2-normalised (a zero sum stays zero).

1:1: the cosine score of every template pair, in chunks. TAR at FAR is read two ways from the ROC (a pair is
accepted when ``score >= threshold``): ``published`` as ``eval_ijbc.py`` reads sklearn's ``roc_curve`` (its
``drop_intermediate`` points, then the point whose FAR is nearest the target, the largest FAR and TAR on ties),
and ``strict``: the best TAR of any threshold whose FAR is at most the target (``None`` when the target is
below one negative pair).

1:N, for each gallery: a probe is mated when its subject has a template in the gallery. Its rank is one plus the
number of other gallery templates scoring at least as high as the mate (ties count against it, as TPIR's
``mate > every non-mate`` does). TPIR at FPIR: the threshold is the ``max(int(n * fpir), 1)``-th highest top score
of the ``n`` non-mated probes; a mated probe counts when its mate scores above every non-mate and above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from partial_fc.errors import InputError
from partial_fc.eval.ijb_meta import Protocol
from partial_fc.eval.roc import RocCurve, roc_curve

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIRS = (0.01, 0.1)
RANKS = (1, 5, 10)
PAIR_CHUNK = 100_000
PROBE_CHUNK = 4096


def image_features(features: np.ndarray, faceness: np.ndarray | None) -> np.ndarray:
    """Per-image features for pooling: ``features`` (embedding + flip) times ``faceness`` when given."""
    features = np.asarray(features, dtype=np.float64)
    return features if faceness is None else features * np.asarray(faceness, dtype=np.float64)[:, None]


def pool_templates(features: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids ascending, [T, D] L2-normalised template features)``: mean within media, sum over media."""
    ids, template_of = np.unique(templates, return_inverse=True)
    media_keys, media_of = np.unique(np.stack([template_of, medias]), axis=1, return_inverse=True)
    media_sums = np.zeros((media_keys.shape[1], features.shape[1]))
    np.add.at(media_sums, media_of, features)
    media_means = media_sums / np.bincount(media_of, minlength=media_keys.shape[1])[:, None]
    pooled = np.zeros((ids.size, features.shape[1]))
    np.add.at(pooled, media_keys[0], media_means)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return ids, pooled / np.where(norms > 0, norms, 1.0)


def rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row index in ``ids`` (ascending template ids) of each of ``wanted``, every one of which must be present."""
    rows = np.searchsorted(ids, wanted)
    if (rows >= ids.size).any() or (ids[np.minimum(rows, ids.size - 1)] != wanted).any():
        raise InputError("a template to score has no pooled feature")
    return rows


def pair_scores(
    ids: np.ndarray, feats: np.ndarray, first: np.ndarray, second: np.ndarray, chunk: int = PAIR_CHUNK
) -> np.ndarray:
    """Cosine score [P] float64 of each template pair, ``chunk`` pairs at a time (memory ~ chunk x D)."""
    scores = np.empty(first.shape[0])
    for start in range(0, first.shape[0], chunk):
        a = feats[rows_of(ids, first[start : start + chunk])]
        b = feats[rows_of(ids, second[start : start + chunk])]
        scores[start : start + chunk] = np.einsum("ij,ij->i", a, b)
    return scores


@dataclass(frozen=True)
class TarReading:
    """TAR at one FAR target, read both ways."""

    far: float
    published_tar: float
    published_far: float
    """The FAR of the ROC point ``published_tar`` was read at."""
    strict_tar: float | None
    strict_threshold: float | None
    """The strict reading accepts ``score > strict_threshold`` (``-inf``: every pair)."""


def score_roc(scores: np.ndarray, same: np.ndarray) -> RocCurve:
    """The exact ROC of scores (higher = same), via :func:`roc_curve` on ``-score`` as a distance."""
    return roc_curve(-np.asarray(scores, dtype=np.float64), np.asarray(same, dtype=bool))


def _sklearn_points(curve: RocCurve, negatives: int, positives: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of sklearn's ``roc_curve(same, score)`` with ``drop_intermediate``: the exact points after
    the accept-nothing one, the collinear inner ones dropped, then (0, 0) put back in front."""
    fps, tps = np.rint(curve.far[1:] * negatives), np.rint(curve.tar[1:] * positives)
    if fps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def tar_at_fars(
    scores: np.ndarray, same: np.ndarray, fars: tuple[float, ...] = FARS
) -> tuple[RocCurve, list[TarReading]]:
    """The ROC and, for each FAR target, the published and the strict TAR (see the module docstring)."""
    same = np.asarray(same, dtype=bool)
    negatives, positives = int((~same).sum()), int(same.sum())
    curve = score_roc(scores, same)
    fpr, tpr = _sklearn_points(curve, negatives, positives)
    fpr, tpr = fpr[::-1], tpr[::-1]  # as eval_ijbc.py: on equal distance, the first point of the flipped curve
    readings = []
    for far in fars:
        nearest = int(np.argmin(np.abs(fpr - far)))
        strict_tar = strict_threshold = None
        if far * negatives >= 1:
            allowed = np.flatnonzero(curve.far <= far)
            best = allowed[np.argmax(curve.tar[allowed])]
            strict_tar, strict_threshold = float(curve.tar[best]), float(-curve.thresholds[best])
        readings.append(TarReading(far, float(tpr[nearest]), float(fpr[nearest]), strict_tar, strict_threshold))
    return curve, readings


@dataclass(frozen=True)
class GalleryResult:
    """1:N numbers of the probes against one gallery."""

    gallery: str
    mated: int
    non_mated: int
    hits: dict[int, int]
    """Rank -> number of mated probes whose mate is within that rank."""
    tpir: dict[float, float | None]
    thresholds: dict[float, float | None]
    achieved_fpir: dict[float, float | None]

    def rank_rate(self, rank: int) -> float | None:
        return self.hits[rank] / self.mated if self.mated else None


def identify(
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    name: str,
    ranks: tuple[int, ...] = RANKS,
    fpirs: tuple[float, ...] = FPIRS,
    chunk: int = PROBE_CHUNK,
) -> GalleryResult:
    """Rank-k rates and TPIR at FPIR of the probes against one gallery (one template per subject)."""
    mate_of = {int(s): i for i, s in enumerate(gallery_subjects)}
    mate = np.array([mate_of.get(int(s), -1) for s in probe_subjects], dtype=np.int64)
    mate_score = np.full(mate.size, -np.inf)
    best_other = np.full(mate.size, -np.inf)  # highest non-mate score (every score, for a non-mated probe)
    rank = np.zeros(mate.size, dtype=np.int64)
    for start in range(0, mate.size, chunk):
        sims = probe_feats[start : start + chunk] @ gallery_feats.T
        rows, cols = np.arange(sims.shape[0]), mate[start : start + chunk]
        mated = cols >= 0
        own = np.where(mated, sims[rows, np.maximum(cols, 0)], -np.inf)
        others = sims.copy()
        others[rows[mated], cols[mated]] = -np.inf
        mate_score[start : start + chunk] = own
        best_other[start : start + chunk] = others.max(axis=1) if others.shape[1] else -np.inf
        rank[start : start + chunk] = 1 + (others >= own[:, None]).sum(axis=1)
    mated = mate >= 0
    correct = mated & (mate_score > best_other)
    top_non_mated = np.sort(best_other[~mated])[::-1]
    tpir, thresholds, achieved = {}, {}, {}
    for fpir in fpirs:
        if top_non_mated.size == 0 or not mated.any():
            tpir[fpir] = thresholds[fpir] = achieved[fpir] = None
            continue
        threshold = float(top_non_mated[max(int(top_non_mated.size * fpir) - 1, 0)])
        tpir[fpir] = float((correct & (mate_score > threshold)).sum() / mated.sum())
        thresholds[fpir] = threshold
        achieved[fpir] = float((top_non_mated > threshold).sum() / top_non_mated.size)
    hits = {k: int((mated & (rank <= k)).sum()) for k in ranks}
    return GalleryResult(name, int(mated.sum()), int((~mated).sum()), hits, tpir, thresholds, achieved)


def mean_over_galleries(results: list[GalleryResult]) -> dict:
    """As ``ijb_evals.py``: rank-k pooled over the galleries' mated probes, TPIR averaged over the galleries."""
    mated = sum(r.mated for r in results)
    ranks = {k: (sum(r.hits[k] for r in results) / mated if mated else None) for k in results[0].hits}
    tpir = {}
    for fpir in results[0].tpir:
        values = [r.tpir[fpir] for r in results]
        tpir[fpir] = None if any(v is None for v in values) else sum(values) / len(values)
    return {"rank": ranks, "tpir": tpir}


def finite_or_none(value: float | None) -> float | None:
    """JSON has no inf or nan."""
    return value if value is not None and math.isfinite(value) else None


def evaluate_protocol(protocol: Protocol, features: np.ndarray, use_faceness: bool = True) -> tuple[dict, RocCurve]:
    """The 1:1 and (with the CSVs) 1:N numbers of ``protocol`` from its image features, JSON-ready, and the ROC."""
    images = protocol.images
    ids, feats = pool_templates(
        image_features(features, images.faceness if use_faceness else None), images.templates, images.medias
    )
    pairs = protocol.pairs
    scores = pair_scores(ids, feats, pairs.first, pairs.second)
    curve, readings = tar_at_fars(scores, pairs.same)
    negatives = int((~pairs.same).sum())
    result = {
        "target": protocol.target,
        "images": len(images.names),
        "templates": int(ids.size),
        "faceness": use_faceness,
        "verification": {
            "pairs": int(scores.size),
            "positive_pairs": int(scores.size - negatives),
            "negative_pairs": negatives,
            "tar_at_far": {
                f"{r.far:.0e}": {
                    "published": r.published_tar,
                    "published_point_far": r.published_far,
                    "strict": r.strict_tar,
                    "strict_threshold": finite_or_none(r.strict_threshold),
                }
                for r in readings
            },
        },
    }
    if protocol.probes is not None:
        probes = protocol.probes
        probe_feats = feats[rows_of(ids, probes.templates)]
        galleries = [
            identify(probe_feats, probes.subjects, feats[rows_of(ids, g.templates)], g.subjects, g.name)
            for g in protocol.galleries
        ]
        mean = mean_over_galleries(galleries)
        result["identification"] = {
            "probes": int(probes.templates.size),
            "galleries": {
                g.gallery: {
                    "templates": int(t.templates.size),
                    "mated_probes": g.mated,
                    "non_mated_probes": g.non_mated,
                    "rank": {str(k): g.rank_rate(k) for k in g.hits},
                    "tpir_at_fpir": {
                        f"{f:g}": {"tpir": g.tpir[f], "threshold": g.thresholds[f], "achieved_fpir": g.achieved_fpir[f]}
                        for f in g.tpir
                    },
                }
                for g, t in zip(galleries, protocol.galleries)
            },
            "mean": {
                "rank": {str(k): v for k, v in mean["rank"].items()},
                "tpir_at_fpir": {f"{f:g}": v for f, v in mean["tpir"].items()},
            },
        }
    return result, curve
