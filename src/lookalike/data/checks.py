"""The checks prepare makes across a subject's photos, as pure functions of what was found in each photo.

Each takes one entry per photo (None where the photo had nothing to check) and returns what it found, keyed
by the photo's index; prepare turns that into reasons and, as configured, warnings or exclusions.
"""

from __future__ import annotations

import numpy as np


def identity_anchor(embeddings: list[np.ndarray | None]) -> np.ndarray | None:
    """The subject's identity as the photos show it: the element-wise median of the faces of photos with exactly
    one face (a median, so that a few photos of someone else do not pull it); None with no such photo."""
    single = [e[0] for e in embeddings if e is not None and len(e) == 1]
    return np.median(np.stack(single), axis=0) if single else None


def choose_faces(embeddings: list[np.ndarray | None], areas: list[list[float] | None]) -> list[int | None]:
    """Which face of each photo is the subject: the only one; in a photo with several, the one nearest the
    identity anchor (the largest when there is no anchor); None for a photo without a face."""
    anchor = identity_anchor(embeddings)
    chosen = []
    for faces, sizes in zip(embeddings, areas):
        if faces is None or len(faces) == 0:
            chosen.append(None)
        elif len(faces) == 1:
            chosen.append(0)
        elif anchor is not None:
            chosen.append(int(np.argmin(np.linalg.norm(faces - anchor, axis=1))))
        else:
            chosen.append(int(np.argmax(sizes)))
    return chosen


def perceptual_hash(image) -> str:
    """A photo's 64-bit perceptual hash (imagehash's pHash), hex: what prepare records and duplicates compares."""
    import imagehash

    return str(imagehash.phash(image))


def duplicates(sha256s: list[str | None], hashes: list[int | None], max_bits: int) -> dict[int, tuple[str, int, int]]:
    """Photos that repeat an earlier one: index -> (kind, index of the earlier photo, differing hash bits); kind
    is 'exact' (same bytes) or 'near' (perceptual hashes within max_bits of 64). The first of a group stays."""
    found: dict[int, tuple[str, int, int]] = {}
    for later in range(len(sha256s)):
        if sha256s[later] is None:
            continue
        for earlier in range(later):
            if earlier in found or sha256s[earlier] is None:
                continue
            if sha256s[earlier] == sha256s[later]:
                found[later] = ("exact", earlier, 0)
                break
            if hashes[earlier] is not None and hashes[later] is not None:
                bits = bin(hashes[earlier] ^ hashes[later]).count("1")
                if bits <= max_bits:
                    found[later] = ("near", earlier, bits)
                    break
    return found


def identity_outliers(embeddings: dict[int, np.ndarray], threshold: float) -> dict[int, float]:
    """Photos whose face is not the subject's: index -> median L2 distance to the other photos' faces, for
    those above the same-person threshold. The median is robust to a minority of strangers; with fewer than
    three faces there is no majority to compare with, and nothing is flagged."""
    if len(embeddings) < 3:
        return {}
    indices = list(embeddings)
    stacked = np.stack([embeddings[i] for i in indices])
    distances = np.linalg.norm(stacked[:, None] - stacked[None], axis=-1)
    outliers = {}
    for row, index in enumerate(indices):
        median = float(np.median(np.delete(distances[row], row)))
        if median > threshold:
            outliers[index] = median
    return outliers
