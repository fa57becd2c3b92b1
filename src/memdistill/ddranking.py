"""An image set written as DD-Ranking (NUS-HPC-AI-Lab/DD-Ranking) reads one: class folders named by
zero-padded label index (``00000``, ``00001``, ...), so that the alphabetical folder order its loader labels by
is the model's class order (its own alphabetical order of wnid or class names would mislabel a set whose
classes are not sorted, e.g. ImageWoof in the model's order), plus CLASS_ORDER.txt mapping index -> class name.

    <out>/00000/00000.png ...   class 0's images (the set's first class), numbered as in the set
    <out>/CLASS_ORDER.txt       one line per class: folder, class name, the model's conditioning label
    <out>/manifest.json, grid.png   as every memdistill image set (DD-Ranking ignores top-level files)
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .evaluate import read_train_folder
from .imageset import ImageSetWriter, check_target

FORMATS = ("ddranking",)
CLASS_ORDER = "CLASS_ORDER.txt"


def class_folder(index: int) -> str:
    """The folder of label ``index``: zero-padded to five digits, so that sorting by name sorts by index."""
    return f"{index:05d}"


def class_order_note(class_names: list[str], cond_labels: list[int] | None, source: str) -> str:
    """CLASS_ORDER.txt: what each zero-padded folder holds."""
    lines = [f"# DD-Ranking export of {source}: folder = label index (the model's class order), class name"
             + (", the model's conditioning label" if cond_labels else "")]
    for i, name in enumerate(class_names):
        lines.append(f"{class_folder(i)} {name}" + (f" {cond_labels[i]}" if cond_labels else ""))
    return "\n".join(lines) + "\n"


def export_ddranking(set_folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the image set ``set_folder`` (from sample or select, or any class-per-folder tree) into ``out`` in
    DD-Ranking's layout (see the module docstring); label i keeps the set's class i. Returns ``out``.
    Raises UserError for an unreadable set, or an existing ``out`` without ``overwrite``."""
    out = check_target(out, overwrite)  # before the set is read
    images, labels, class_names, manifest = read_train_folder(set_folder)  # (N, C, H, W) in [-1, 1], (N,)
    cond = manifest.get("cond_labels")
    cond = cond if isinstance(cond, list) and len(cond) == len(class_names) else None
    if len(class_names) > 10 ** 5:
        raise UserError(f"{set_folder} has {len(class_names)} classes; the five-digit folders hold at most 100000")
    next_index = [0] * len(class_names)
    with ImageSetWriter(out, [class_folder(i) for i in range(len(class_names))], images.shape[1:], overwrite) as w:
        for x, y in zip(images, labels.tolist()):
            w.add(x, y, next_index[y])
            next_index[y] += 1
        (w.partial / CLASS_ORDER).write_text(class_order_note(class_names, cond, str(set_folder)))
        return w.commit({"stage": manifest.get("stage", "select"), "config": {"format": "ddranking"},
                         "method": manifest.get("method"), "export": "ddranking", "class_order": class_names,
                         "cond_labels": cond, "source": str(set_folder)})
