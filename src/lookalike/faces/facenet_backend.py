"""The study's face backend: MTCNN finds and aligns faces, InceptionResnetV1 (VGGFace2 weights) embeds them.

facenet-pytorch ships MTCNN's weights; the VGGFace2 weights are downloaded on first use into
$TORCH_HOME/checkpoints. They are read here from that file with torch.load's weights_only mode, and a missing
file offline is an error that says which file to put where.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.faces import Face

WEIGHTS_FILE = "20180402-114759-vggface2.pt"
MTCNN_MIN_FACE = 20.0
EMBED_BATCH = 32
WEIGHTS_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/" + WEIGHTS_FILE


def weights_path() -> Path:
    torch_home = os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch")
    return Path(torch_home) / "checkpoints" / WEIGHTS_FILE


def _load_vggface2(model) -> None:
    import torch

    path = weights_path()
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, str(path.with_suffix(".part")), progress=False)
            path.with_suffix(".part").rename(path)
        except Exception as error:  # no network: urllib's errors vary by platform
            raise LookalikeError(
                f"facenet needs the VGGFace2 weights {WEIGHTS_FILE} and could not download them ({error}); "
                f"download {WEIGHTS_URL} and put it at {path} (or use --face-backend dlib, which works offline)"
            ) from None
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class MtcnnDetector:
    """MTCNN alone (its weights ship with facenet-pytorch): prepare's detector, and facenet's."""

    name = "mtcnn"
    thread_safe = True
    default_min_score = 0.95  # MTCNN probability; weaker detections are mostly not faces

    def __init__(self, device=None):
        import torch
        from facenet_pytorch import MTCNN

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mtcnn = MTCNN(image_size=160, margin=0, keep_all=True, post_process=True, device=self.device)
        # Channels-last weights make the convolutions' outputs channels-last, where max pooling (MTCNN's costliest
        # step on a CPU) runs 3x faster; detection as a whole 20%. Boxes move by under 0.001 px.
        for net in (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet):
            net.to(memory_format=torch.channels_last)

    def find_faces(self, image, min_size: float = 0.0) -> list[Face]:
        import torch
        from facenet_pytorch.models.utils.detect_face import detect_face
        from PIL import Image

        # MTCNN searches down to 20 px faces. When only faces of min_size px count, it searches a copy shrunk
        # so that min_size becomes 20 px: a 1024 px image with a 5% floor is searched at 400 px, 3x faster,
        # with boxes as close to full-size detection as MTCNN's own scales are to one another. Embeddings are
        # still cut from the full-size image.
        scale = min(1.0, MTCNN_MIN_FACE / min_size) if min_size > 0 else 1.0
        if scale < 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)),
                                 Image.Resampling.BILINEAR, reducing_gap=2.0)
        if min(image.size) < MTCNN_MIN_FACE:
            return []
        mtcnn = self.mtcnn
        with torch.no_grad():
            boxes, _ = detect_face(image, MTCNN_MIN_FACE, mtcnn.pnet, mtcnn.rnet, mtcnn.onet, mtcnn.thresholds,
                                   mtcnn.factor, self.device)
        faces = [Face(tuple(float(v) / scale for v in row[:4]), float(row[4]))
                 for row in np.asarray(boxes[0]).reshape(-1, 5)]
        return sorted(faces, key=lambda f: -f.score)


class FacenetBackend:
    name = "facenet"
    same_person_threshold = 1.0  # L2 between unit embeddings; VGGFace2 facenet separates identities near 1.0-1.1
    thread_safe = MtcnnDetector.thread_safe
    default_min_score = MtcnnDetector.default_min_score

    def __init__(self, pretrained: bool = True, device: str | None = None):
        """pretrained=False uses random embedding weights: the code path runs, the numbers mean nothing."""
        import facenet_pytorch
        import torch
        from facenet_pytorch import InceptionResnetV1

        self.version = getattr(facenet_pytorch, "__version__", "2.6.0") + ("" if pretrained else "+random")
        self.detector = MtcnnDetector(device)
        self.device = self.detector.device
        self.encoder = InceptionResnetV1(pretrained=None, classify=False, num_classes=8631).eval()
        if pretrained:
            _load_vggface2(self.encoder)
        self.encoder.to(self.device, memory_format=torch.channels_last)  # 20% faster on a CPU, same numbers

    def find_faces(self, image, min_size: float = 0.0) -> list[Face]:
        return self.detector.find_faces(image, min_size)

    def embed(self, faces: Sequence[tuple[object, Face]]) -> np.ndarray:
        import torch
        from facenet_pytorch.models.mtcnn import extract_face, fixed_image_standardization

        crops = [fixed_image_standardization(extract_face(image, np.asarray(face.box), image_size=160, margin=0))
                 for image, face in faces]
        rows = []
        with torch.no_grad():
            for start in range(0, len(crops), EMBED_BATCH):
                batch = torch.stack(crops[start:start + EMBED_BATCH]).to(self.device,
                                                                         memory_format=torch.channels_last)
                rows.append(self.encoder(batch).cpu().numpy().astype(np.float32))
        return np.concatenate(rows) if rows else np.zeros((0, 512), dtype=np.float32)
