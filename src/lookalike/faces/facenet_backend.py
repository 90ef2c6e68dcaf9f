"""The study's face backend: MTCNN finds and aligns faces, InceptionResnetV1 (VGGFace2 weights) embeds them.

facenet-pytorch ships MTCNN's weights; the VGGFace2 weights are downloaded on first use into
$TORCH_HOME/checkpoints. They are read here from that file with torch.load's weights_only mode, and a missing
file offline is an error that says which file to put where.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.faces import Face

WEIGHTS_FILE = "20180402-114759-vggface2.pt"
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


class FacenetBackend:
    name = "facenet"
    same_person_threshold = 1.0  # L2 between unit embeddings; VGGFace2 facenet separates identities near 1.0-1.1
    default_min_score = 0.95  # MTCNN probability; weaker detections are mostly not faces

    def __init__(self, pretrained: bool = True, device: str | None = None):
        """pretrained=False uses random embedding weights: the code path runs, the numbers mean nothing."""
        import facenet_pytorch
        import torch
        from facenet_pytorch import MTCNN, InceptionResnetV1

        self.version = getattr(facenet_pytorch, "__version__", "2.6.0") + ("" if pretrained else "+random")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.detector = MTCNN(image_size=160, margin=0, keep_all=True, post_process=True, device=self.device)
        self.encoder = InceptionResnetV1(pretrained=None, classify=False, num_classes=8631).eval()
        if pretrained:
            _load_vggface2(self.encoder)
        self.encoder.to(self.device)

    def find_faces(self, image) -> list[Face]:
        boxes, probabilities = self.detector.detect(image)
        if boxes is None:
            return []
        faces = [Face(tuple(float(v) for v in box), float(p)) for box, p in zip(boxes, probabilities)]
        return sorted(faces, key=lambda f: -f.score)

    def embed(self, image, face: Face) -> np.ndarray:
        import torch
        from facenet_pytorch.models.mtcnn import extract_face, fixed_image_standardization

        crop = extract_face(image, np.asarray(face.box), image_size=160, margin=0)
        with torch.no_grad():
            embedding = self.encoder(fixed_image_standardization(crop)[None].to(self.device))[0]
        return embedding.cpu().numpy().astype(np.float32)
