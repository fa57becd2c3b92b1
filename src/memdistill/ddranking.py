"""An image set written as DD-Ranking (NUS-HPC-AI-Lab/DD-Ranking) reads one: class folders named by
zero-padded label index (``00000``, ``00001``, ...), the index of the class in the model's full class list, as its
loader reads the folder index as the label (its own alphabetical order of wnid or class names would mislabel a set
whose classes are not sorted, e.g. ImageWoof in the model's order), plus CLASS_ORDER.txt mapping index -> class
name. A set sampled with ``--classes 7,3`` is written into 00007 and 00003: its manifest's "classes" records each
class's index in the model's class list; a set of some classes whose indices are not recorded is refused.

    <out>/00000/00000.png ...   the images of the model's class 0, numbered as in the set
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


def class_order_note(class_names: list[str], cond_labels: list[int] | None, source: str,
                     indices: list[int] | None = None) -> str:
    """CLASS_ORDER.txt: what each zero-padded folder holds; ``indices``: the label index of each class (None:
    0..K-1)."""
    indices = list(range(len(class_names))) if indices is None else indices
    lines = [f"# DD-Ranking export of {source}: folder = label index (the model's class order), class name"
             + (", the model's conditioning label" if cond_labels else "")]
    for i, (index, name) in enumerate(zip(indices, class_names)):
        lines.append(f"{class_folder(index)} {name}" + (f" {cond_labels[i]}" if cond_labels else ""))
    return "\n".join(lines) + "\n"


def label_indices(manifest: dict, num_classes: int, set_folder: str | Path) -> list[int]:
    """The label index of each of the set's ``num_classes`` classes: its position in the model's full class list.

    A sampled set records it as "classes" (``sample --classes 7,3`` -> [7, 3]; an export keeps it); a set without it
    holds a whole class list in its own order (select, a plain class tree) -> 0..K-1, except a sampled set, whose
    classes may be a subset of the model's. Raises UserError when the indices are unknown or malformed."""
    classes = manifest.get("classes")
    if classes is None:
        if manifest.get("stage") == "sample":
            raise UserError(f"{set_folder}: its manifest does not record which of the model's classes it holds "
                            "(\"classes\"), so the label index of each folder is unknown; sample it again")
        return list(range(num_classes))
    if not (isinstance(classes, list) and len(classes) == num_classes
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 10 ** 5 for c in classes)
            and len(set(classes)) == len(classes)):
        raise UserError(f"{set_folder}: its manifest's \"classes\" must be {num_classes} distinct label indices in "
                        f"0..99999 (one per class folder), got {classes!r:.80}")
    return list(classes)


def export_ddranking(set_folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the image set ``set_folder`` (from sample or select, or any class-per-folder tree) into ``out`` in
    DD-Ranking's layout (see the module docstring): each class in the folder of its index in the model's class list
    (label_indices). Returns ``out``. Raises UserError for an unreadable set, a set of some classes whose indices are
    unknown, or an existing ``out`` without ``overwrite``."""
    out = check_target(out, overwrite)  # before the set is read
    images, labels, class_names, manifest = read_train_folder(set_folder)  # (N, C, H, W) in [-1, 1], (N,)
    cond = manifest.get("cond_labels")
    cond = cond if isinstance(cond, list) and len(cond) == len(class_names) else None
    if len(class_names) > 10 ** 5:
        raise UserError(f"{set_folder} has {len(class_names)} classes; the five-digit folders hold at most 100000")
    indices = label_indices(manifest, len(class_names), set_folder)
    next_index = [0] * len(class_names)
    with ImageSetWriter(out, [class_folder(i) for i in indices], images.shape[1:], overwrite) as w:
        for x, y in zip(images, labels.tolist()):
            w.add(x, y, next_index[y])
            next_index[y] += 1
        (w.partial / CLASS_ORDER).write_text(class_order_note(class_names, cond, str(set_folder), indices))
        return w.commit({"stage": manifest.get("stage", "select"), "config": {"format": "ddranking"},
                         "method": manifest.get("method"), "export": "ddranking", "class_order": class_names,
                         "cond_labels": cond, "classes": indices, "source": str(set_folder)})
