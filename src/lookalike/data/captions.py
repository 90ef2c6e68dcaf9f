"""Captions by a vision-language model ([data] captioner, or `lookalike caption`): each kept photo's training crop
described in words by an image-to-text model of transformers (BLIP, or a chat VLM asked for one sentence), the
person's description ("a man", "the young woman") replaced by the trigger word, written once to
data/captions/<photo>-<its sha256>.txt. A user may edit those files: one that exists is never written over
(delete it to caption that photo again), and a caption .txt beside the photo still wins over both.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from rich.console import Console

from lookalike.data.crop import crop_and_resize
from lookalike.data.images import load_rgb
from lookalike.errors import LookalikeError
from lookalike.progress import progress_bar
from lookalike.workspace import atomic_path

INSTRUCTION = "Describe this photo in one sentence."
_ADJECTIVES = r"(?:(?:young|old|older|elderly|smiling|bald|bearded|middle-aged|happy|serious)\s+)*"


def with_trigger(description: str, class_word: str) -> str:
    """The first person the description names ('a man', 'the smiling woman', 'a <class word>') becomes
    '{token} man' ({token} is filled in with the trigger word later); a description that names nobody gets
    '{token} <class word>, ' in front, and an empty one is '{token} <class word>'."""
    if not description.strip():  # a model with nothing to say
        return f"{{token}} {class_word}"
    nouns = "|".join(map(re.escape, dict.fromkeys(["man", "woman", "person", "boy", "girl", "guy", "lady",
                                                   "gentleman", class_word])))
    match = re.search(rf"\b(?:a|an|the)\s+{_ADJECTIVES}({nouns})\b", description, flags=re.IGNORECASE)
    if match is None:
        return f"{{token}} {class_word}, {description}"
    return description[:match.start()] + f"{{token}} {match.group(1)}" + description[match.end():]


class Captioner:
    """An image-to-text model loaded once: AutoProcessor and AutoModelForImageTextToText of a hub id or folder."""

    def __init__(self, model: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model).eval()
        except (OSError, ValueError) as error:
            raise LookalikeError(f"data.captioner: cannot load {model!r} as an image-to-text model: "
                                 f"{str(error).strip().splitlines()[0]}") from None

    def describe(self, image) -> str:
        import torch

        if getattr(self.processor, "chat_template", None):  # a chat VLM: ask for one sentence
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        else:  # a captioning model (BLIP): the image alone
            inputs = self.processor(images=image, return_tensors="pt")
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=40, do_sample=False)
        if "input_ids" in inputs:  # the answer only, not the prompt it continues
            ids = ids[:, inputs["input_ids"].shape[1]:]
        return " ".join(self.processor.batch_decode(ids, skip_special_tokens=True)[0].split())


# Byte-order marks an editor may begin a text file with (Windows' Notepad saves UTF-16 with one), longest first.
_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
          (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_caption(path: Path) -> str | None:
    """A caption file's text, stripped: UTF-8, or any encoding its byte-order mark names; None where there is no
    file. A folder in its place, or text in another encoding, is refused by name."""
    path = Path(path)
    if path.is_dir():
        raise LookalikeError(f"{path}: a folder where a caption file is read; move it away")
    if not path.is_file():
        return None
    data = path.read_bytes()
    encoding = next((name for mark, name in _MARKS if data.startswith(mark)), "utf-8")
    try:
        return data.decode(encoding).strip()
    except UnicodeDecodeError:
        raise LookalikeError(f"{path}: not UTF-8 text; save the caption as UTF-8 (or with a byte-order mark)") \
            from None


def empty_caption(file: Path, console: Console) -> None:
    console.print(f"warning: {file} is empty: its photo trains with the default caption ([subject] caption)",
                  highlight=False)


def caption_file(data: Path, photo) -> Path:
    return data / "captions" / f"{Path(photo.source).stem}-{photo.sha256[:8]}.txt"


def describe_photos(model: str | None, kept: list, data: Path, resolution: int, class_word: str,
                    console: Console) -> dict[str, str]:
    """{photo source: its caption template} for every kept photo with a caption file, captioning those without
    one first when a model is given (without one, the files `lookalike caption` wrote are still used)."""
    captions = {photo.source: read_caption(caption_file(data, photo)) for photo in kept}
    for photo in kept:
        if captions[photo.source] == "":  # an edited file emptied: said, then the default caption
            empty_caption(caption_file(data, photo), console)
    missing = [photo for photo in kept if captions[photo.source] is None]
    if missing and model:
        captioner = Captioner(model)
        with progress_bar(console, "caption", total=len(missing)) as bar:
            for photo in missing:
                crop = crop_and_resize(load_rgb(Path(photo.source)), tuple(photo.crop_box), resolution)
                caption_file(data, photo).parent.mkdir(parents=True, exist_ok=True)
                captions[photo.source] = with_trigger(captioner.describe(crop), class_word)
                with atomic_path(caption_file(data, photo)) as tmp:
                    tmp.write_text(captions[photo.source] + "\n")
                bar.update()
    return {source: caption for source, caption in captions.items() if caption is not None}
