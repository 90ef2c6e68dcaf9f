"""CLIP Score: the raw cosine similarity of CLIP's text and image embeddings (the study reports 0.29-0.30;
torchmetrics reports 100x that). Images and texts are embedded in batches, each once."""

from __future__ import annotations

import torch

from lookalike.models.base import inference_dtype, pick_device


class ClipScorer:
    def __init__(self, model, processor, device: torch.device | None = None, batch_size: int = 16):
        self.device = device or pick_device()
        self.dtype = inference_dtype(self.device)  # as for generation: bfloat16 on a GPU, float32 on the CPU
        self.model = model.to(self.device, self.dtype).eval()
        self.processor = processor
        self.batch_size = batch_size
        self._texts: dict[str, torch.Tensor] = {}  # a prompt set is scored against chunk after chunk of images

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        # transformers 5 returns output objects from get_*_features; older versions returned the tensor.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start:start + self.batch_size], return_tensors="pt")
            pixel_values = pixels["pixel_values"].to(self.device, self.dtype)
            chunks.append(self._tensor(self.model.get_image_features(pixel_values)))
        features = torch.cat(chunks).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._texts]
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start:start + self.batch_size]
            tokens = self.processor(text=batch, return_tensors="pt", padding=True, truncation=True)
            features = self._tensor(self.model.get_text_features(tokens["input_ids"].to(self.device),
                                                                 tokens["attention_mask"].to(self.device))).float()
            self._texts.update(zip(batch, features / features.norm(dim=-1, keepdim=True)))
        return torch.stack([self._texts[t] for t in texts])

    def paired(self, images, texts: list[str]) -> list[float]:
        """Cosine of each image with its own prompt (each distinct prompt embedded once)."""
        return (self.image_features(images) * self.text_features(texts)).sum(dim=-1).cpu().tolist()

    def all_pairs(self, images, texts: list[str]) -> torch.Tensor:
        """Cosine of every image with every prompt (images x texts): the study's all-pairs average is its mean."""
        return (self.image_features(images) @ self.text_features(texts).T).cpu()
