"""The cosine geometry the memory losses work with: within-class and between-class cosines of memory entries.

    PYTHONPATH=src python benchmarks/memory_geometry.py --data mnist5k --codec pixel|vae [--vae FOLDER]
        [--pairs 20000] [--seed 0] [--flip auto|on|off]

The entries are what the real memories would hold (METHOD.md section 4): the training latents as one training
step draws them (train.load_train_data, LatentPosterior.draw: a posterior sample, and a flip with --flip on) for
the VAE codec, the images in [-1, 1] for the pixel codec. On a seeded sample of --pairs same-class pairs and as many
different-class pairs (two distinct entries each) it prints the mean and the 5th and 95th percentiles of their
cosines, then the same after subtracting the dataset mean entry. Where within- and between-class cosines are close,
"most similar" and "least similar" say little about the class, and the memory losses have little to work with.
"""

from __future__ import annotations

import argparse

import torch

from memdistill.errors import UserError
from memdistill.losses import unit_rows
from memdistill.train import TrainConfig, load_train_data


def sample_pairs(targets: torch.Tensor, pairs: int, same: bool, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j), each (pairs,): ``pairs`` pairs of distinct entries of one class (``same``) or of two classes, drawn
    uniformly (the first entry uniform over all, the second uniform over the allowed ones) from ``generator``."""
    n = len(targets)
    i = torch.randint(n, (pairs,), generator=generator)
    j = torch.empty_like(i)
    for k, a in enumerate(i.tolist()):
        allowed = (targets == targets[a]) if same else (targets != targets[a])
        if same:
            allowed[a] = False
        choices = allowed.nonzero().view(-1)
        j[k] = choices[torch.randint(len(choices), (1,), generator=generator)]
    return i, j


def pair_cosines(entries: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """cos(entries[i], entries[j]) (P,) on flattened entries (N, ...), as the memory losses compute it."""
    units = unit_rows(entries.flatten(1).double())  # (N, D)
    return (units[i] * units[j]).sum(dim=1)


def summary(cos: torch.Tensor) -> tuple[float, float, float]:
    """(mean, 5th percentile, 95th percentile) of the cosines ``cos`` (P,)."""
    q = torch.quantile(cos, torch.tensor([0.05, 0.95], dtype=cos.dtype))
    return float(cos.mean()), float(q[0]), float(q[1])


def geometry(entries: torch.Tensor, targets: torch.Tensor, pairs: int, seed: int) -> dict[str, tuple[float, ...]]:
    """{"raw within", "raw between", "centred within", "centred between"} -> summary, on the same pairs for the raw
    and the mean-subtracted entries (N, ...)."""
    g = torch.Generator().manual_seed(seed)
    drawn = {kind: sample_pairs(targets, pairs, kind == "within", g) for kind in ("within", "between")}
    centred = entries - entries.mean(dim=0, keepdim=True)
    return {f"{name} {kind}": summary(pair_cosines(x, *drawn[kind]))
            for name, x in (("raw", entries), ("centred", centred)) for kind in ("within", "between")}


def memory_entries(data: str, codec: str, vae: str | None, flip: str, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(entries (N, C, h, w), targets (N,), a description): each training image's latent as one step draws it."""
    cfg = TrainConfig(data=data, codec=codec, vae=vae, flip=flip, device="cpu", seed=seed)
    cfg.validate()
    train = load_train_data(cfg)
    entries = train.posterior.draw(torch.arange(len(train.targets)), torch.Generator().manual_seed(seed))
    shape = "x".join(map(str, train.latent_shape))
    return entries, train.targets, f"{data} train, {len(entries)} entries of {shape}, codec {codec}, flip {train.flip}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist5k", help="embedded dataset or class-per-folder tree (default: mnist5k)")
    p.add_argument("--codec", default="pixel", choices=("pixel", "vae"))
    p.add_argument("--vae", default=None, help="AutoencoderKL folder (with --codec vae)")
    p.add_argument("--flip", default="auto", help="auto, on or off, as fine-tuning's --flip (default: auto)")
    p.add_argument("--pairs", type=int, default=20000, help="pairs per kind (default: 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs and of the latent draws (default: 0)")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be at least 1")

    try:
        entries, targets, what = memory_entries(args.data, args.codec, args.vae, args.flip, args.seed)
    except UserError as err:  # one line and exit code 2, as the memdistill commands
        p.exit(2, f"memory_geometry.py: error: {err}\n")
    print(f"memory geometry: {what}; {args.pairs} pairs per kind, seed {args.seed}")
    print(f"{'entries':<8} {'pairs':<8} {'mean':>7} {'p5':>7} {'p95':>7}")
    for key, (mean, p5, p95) in geometry(entries, targets, args.pairs, args.seed).items():
        name, kind = key.split()
        print(f"{name:<8} {kind:<8} {mean:7.3f} {p5:7.3f} {p95:7.3f}")


if __name__ == "__main__":
    main()
