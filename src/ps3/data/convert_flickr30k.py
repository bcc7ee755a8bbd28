"""Flickr30k Entities → pre-training shards: ``ps3 data from-flickr30k-entities`` (design §5).

Flickr30k Entities annotates the five captions of each Flickr30k image:

* ``Sentences/ID.txt``: one caption per line, with each phrase that names an entity marked up
  as ``[/EN#18/people A child]`` (entity id, one or more types separated by ``/``, the phrase).
  Type ``notvisual`` (entity id 0) marks phrases that refer to nothing in the image.
* ``Annotations/ID.xml``: PASCAL-VOC-like: ``<size><width>``/``<height>``, and per
  ``<object>`` one or more ``<name>`` entity ids with either a ``<bndbox>`` (``xmin``, ``ymin``,
  ``xmax``, ``ymax``: 1-based, inclusive pixel indices) or ``<nobndbox>1</nobndbox>`` and
  ``<scene>0|1</scene>`` (the entity is the whole scene, or is not visible).

Conversion:

* Each marked phrase becomes a region with its entity's box, ``[xmin - 1, ymin - 1, xmax, ymax]``
  in edge coordinates. An entity with several boxes ("two dogs") gets the box enclosing them
  all. The same entity is usually named in several captions ("a child", "a little girl"): the
  different phrases on one box are merged into one region.
* Phrases of ``notvisual`` entities, of scene entities and of entities without a box are
  dropped and counted.
* The captions, markup removed and tokenisation undone (``"stairs ."`` → ``"stairs."``),
  become ``global_text`` (``--global-caption``).
* ``--split train.txt`` keeps the image ids listed in a split file (one id per line). Images
  come in sorted id order; the key is the image id.
"""
from __future__ import annotations

import argparse
import os
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from ..runtime import UserError
from .convert_common import DropLog, SourceImage, sanitize_key
from .convert_run import add_common_arguments, run_conversion

__all__ = ["FLICKR_DROP_REASONS", "parse_sentence", "read_flickr30k_entities", "add_arguments", "run_from_args"]

FLICKR_DROP_REASONS = {
    "not_visual": "region: a phrase marked notvisual (it names nothing in the image)",
    "scene": "region: a phrase whose entity is the whole scene (no box; the captions cover the scene)",
    "no_box": "region: a phrase whose entity has no box (not visible, or not in the annotation file)",
    "missing_annotation": "image: no Annotations/ID.xml (or it does not parse); its captions are kept as global text",
    "missing_sentences": "image: an annotation file without Sentences/ID.txt",
}
_PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]]+)?)\s+([^\]]*)\]")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,!?;:]|'s\b|n't\b|'re\b|'ll\b|'ve\b|'m\b|'d\b)")


def parse_sentence(line: str) -> tuple[str, list[tuple[str, set[str], str]]]:
    """(plain caption, [(entity id, types, phrase), …]) of one Sentences line."""
    phrases = [(m.group(1), set(filter(None, m.group(2).split("/"))), m.group(3)) for m in _PHRASE.finditer(line)]
    plain = _PHRASE.sub(lambda m: m.group(3), line)
    plain = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(plain.split()))
    return plain, phrases


class _Entities:
    """What one Annotations XML file says: the declared size, boxes per entity id, scene and
    box-less ids."""

    def __init__(self, path: Path) -> None:
        root = ElementTree.parse(path).getroot()
        self.filename = (root.findtext("filename") or "").strip() or None
        width, height = root.findtext("size/width"), root.findtext("size/height")
        self.size = (int(width), int(height)) if width and height else None
        self.boxes: dict[str, list[list[float]]] = {}
        self.scene: set[str] = set()
        self.no_box: set[str] = set()
        for element in root.iter("object"):
            ids = [(name.text or "").strip() for name in element.findall("name")]
            box = element.find("bndbox")
            if box is not None:
                xmin, ymin, xmax, ymax = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
                for entity in ids:
                    self.boxes.setdefault(entity, []).append([xmin - 1, ymin - 1, xmax, ymax])
                continue
            if (element.findtext("scene") or "0").strip() not in ("", "0"):
                self.scene.update(ids)
            else:
                self.no_box.update(ids)

    def box(self, entity: str) -> list[float] | None:
        boxes = self.boxes.get(entity)
        if not boxes:
            return None
        return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def _image_ids(annotations: Path, sentences: Path, split: str | os.PathLike | None) -> list[str]:
    if split is not None:
        try:
            with open(split, encoding="utf-8") as handle:
                return [line.strip() for line in handle if line.strip()]
        except OSError as exc:
            raise UserError(f"--split: cannot read {split}: {exc.strerror or exc}") from None
    ids = {p.stem for p in annotations.glob("*.xml")} | {p.stem for p in sentences.glob("*.txt")}
    return sorted(ids, key=lambda i: (len(i), i))  # numeric ids in numeric order


def _read_entities(path: Path, name: str, drops: DropLog) -> _Entities | None:
    try:
        return _Entities(path)
    except OSError:
        drops.add("missing_annotation", f"{name}: no {path.name}")
    except (ElementTree.ParseError, TypeError, ValueError) as exc:
        drops.add("missing_annotation", f"{name}: {path.name} does not parse ({exc})")
    return None


def _add_phrases(source: SourceImage, entities: _Entities | None, phrases, drops: DropLog) -> None:
    for entity, types, text in phrases:
        where = f"{source.name}: [/EN#{entity}/{'/'.join(sorted(types))} {text}]"
        if "notvisual" in types or entity == "0":
            drops.add("not_visual", where)
        elif entities is None:
            continue  # counted once per image as missing_annotation
        elif (box := entities.box(entity)) is not None:
            source.regions.append((text, box))
        elif entity in entities.scene:
            drops.add("scene", where)
        else:
            drops.add("no_box", where)


def read_flickr30k_entities(images_dir: str | os.PathLike, annotations_dir: str | os.PathLike,
                            sentences_dir: str | os.PathLike, *,
                            split: str | os.PathLike | None = None) -> tuple[list[SourceImage], DropLog]:
    """The images of Flickr30k Entities with their phrase regions and captions, and what was dropped."""
    annotations, sentences = Path(annotations_dir), Path(sentences_dir)
    for argument, folder in (("--annotations", annotations), ("--sentences", sentences)):
        if not folder.is_dir():
            raise UserError(f"{argument}: {folder} is not a directory")
    drops = DropLog()
    sources = []
    for image_id in _image_ids(annotations, sentences, split):
        name = f"{image_id}.jpg"
        try:
            lines = (sentences / f"{image_id}.txt").read_text(encoding="utf-8").splitlines()
        except OSError:
            drops.add("missing_sentences", f"{name}: no Sentences/{image_id}.txt")
            continue
        entities = _read_entities(annotations / f"{image_id}.xml", name, drops)
        if entities is not None and entities.filename:
            name = entities.filename
        source = SourceImage(key=sanitize_key(image_id), path=str(Path(images_dir) / name), name=name,
                             declared_size=entities.size if entities is not None else None)
        for line in lines:
            if line.strip():
                plain, phrases = parse_sentence(line)
                source.global_texts.append(plain)
                _add_phrases(source, entities, phrases, drops)
        sources.append(source)
    return sources, drops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of the Flickr30k images (ID.jpg)")
    parser.add_argument("--annotations", required=True, help="the Annotations folder (ID.xml)")
    parser.add_argument("--sentences", required=True, help="the Sentences folder (ID.txt)")
    parser.add_argument("--split", help="convert only the image ids listed in this file (e.g. train.txt)")

    add_common_arguments(parser)

def run_from_args(args: argparse.Namespace) -> int:
    sources, drops = read_flickr30k_entities(args.images, args.annotations, args.sentences, split=args.split)
    settings = {key: getattr(args, key) and os.path.abspath(getattr(args, key))
                for key in ("images", "annotations", "sentences", "split")}
    return run_conversion(args, sources, drops, source_name="flickr30k-entities", settings=settings,
                          reasons=FLICKR_DROP_REASONS)
