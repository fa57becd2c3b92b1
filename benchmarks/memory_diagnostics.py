"""Which timesteps feed the memory losses, and how strong their gradients are beside the diffusion loss.

    PYTHONPATH=src python benchmarks/memory_diagnostics.py [--steps 300] [--model mnist5k] [--threads 1]

Replays the first --steps batches of the embedded default fine-tuning (mnist5k, batch 8, seed 0, the
same batches, timesteps and noise as `memdistill finetune`) on the fixed starting model, with the memories
updated as in training (self-adaptive, N_R = N_G = 64); the model is not optimised, so the figures describe
the losses at the start of fine-tuning. Once the memories are full (after step 100) it reports:

- for each loss, the timestep of the one prediction its extreme picks (the max-cosine pair of the diversity
  loss, the min-cosine pair of the representativeness loss), binned, against the uniform draw of t;
- the norm of the gradient on the trainable (DiffFit) parameters of lambda * L_gen and lambda * L_real at
  the paper's lambdas, divided by that of the diffusion loss on the same batch (median over steps).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from memdistill.diffusion import GaussianDiffusion
from memdistill.losses import cosine_matrix, memory_loss
from memdistill.memory import ClassMemories
from memdistill.models.dit import set_trainable
from memdistill.models.io import load_dit
from memdistill.pretrained import resolve_model
from memdistill.train import TrainConfig, load_train_data, step_draws, step_latents

BINS = (0, 100, 250, 500, 750, 1000)


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def bin_of(t: int) -> int:
    return next(i for i in range(len(BINS) - 1) if BINS[i] <= t < BINS[i + 1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--measure-from", type=int, default=100, help="first step counted (memories full)")
    p.add_argument("--model", default="mnist5k")
    p.add_argument("--lambda-real", type=float, default=0.002)
    p.add_argument("--lambda-gen", type=float, default=0.008)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = TrainConfig(data="mnist5k", codec="pixel", batch_size=8, device="cpu")
    data = load_train_data(cfg)
    model = load_dit(resolve_model(args.model))
    set_trainable(model, "difffit")
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    diffusion = GaussianDiffusion()
    memories = ClassMemories(len(data.class_names), 64, 64, "adaptive")
    cond = torch.tensor(data.cond_labels)
    n = len(data.targets)

    picked = {"gen": [0] * (len(BINS) - 1), "real": [0] * (len(BINS) - 1)}
    drawn = [0] * (len(BINS) - 1)
    ratios: dict[str, list[float]] = {"gen": [], "real": []}
    for step in range(args.steps):
        # The draws of the training loop of `memdistill finetune` at this step.
        idx, t, noise, drop = step_draws(cfg, step, n, data.latent_shape, diffusion)
        x0, labels = step_latents(data.posterior, cfg.seed, step, idx), data.targets[idx]

        def model_fn(x, tt, yy, _drop=drop):
            return model(x, tt, yy, force_drop_ids=_drop)

        terms = diffusion.training_losses(model_fn, x0, t, cond[labels], noise)
        pred = terms["pred_x0"]
        if step >= args.measure_from:
            for tt in t.tolist():
                drawn[bin_of(tt)] += 1
            for c in torch.unique(labels).tolist():
                if len(memories.gen(c)) == 0:
                    continue  # the losses skip a class until its memories hold something
                rows = (labels == c).nonzero().view(-1)
                sims = {"gen": cosine_matrix(pred[rows].detach(), memories.gen(c).tensor()),
                        "real": cosine_matrix(pred[rows].detach(), memories.real(c).tensor())}
                at_gen = int(sims["gen"].max(dim=1).values.argmax())  # the row the max-cosine pair uses
                at_real = int(sims["real"].min(dim=1).values.argmin())  # the row the min-cosine pair uses
                picked["gen"][bin_of(int(t[rows[at_gen]]))] += 1
                picked["real"][bin_of(int(t[rows[at_real]]))] += 1
            diff = grad_norm(terms["loss"].mean(), params)
            gen, _ = memory_loss(pred, labels, memories, 0.0, args.lambda_gen)
            real, _ = memory_loss(pred, labels, memories, args.lambda_real, 0.0)
            ratios["gen"].append(grad_norm(gen, params) / diff)
            ratios["real"].append(grad_norm(real, params) / diff)
        memories.update(labels, x0, pred.detach())

    counted = args.steps - args.measure_from
    print(f"model {args.model}, mnist5k, batch 8, steps {args.measure_from + 1}-{args.steps} ({counted} batches), "
          f"adaptive memories of 64, torch {torch.__version__}, {args.threads} thread(s)")
    print("\nshare of picks by timestep bin (the prediction each loss's extreme pair uses) vs. the draw of t:")
    print(f"{'t bin':>12} {'drawn':>8} {'L_gen':>8} {'L_real':>8}")
    for i in range(len(BINS) - 1):
        print(f"{f'[{BINS[i]}, {BINS[i + 1]})':>12} {drawn[i] / sum(drawn):8.1%} "
              f"{picked['gen'][i] / sum(picked['gen']):8.1%} {picked['real'][i] / sum(picked['real']):8.1%}")
    print("\n|grad of lambda * memory term| / |grad of the diffusion loss| on the DiffFit parameters, "
          "median (quartiles) over steps:")
    for name, lam in (("gen", args.lambda_gen), ("real", args.lambda_real)):
        q = statistics.quantiles(ratios[name], n=4)
        print(f"  L_{name:<4} lambda {lam:g}: {statistics.median(ratios[name]):.4f} ({q[0]:.4f} - {q[2]:.4f})")


if __name__ == "__main__":
    main()
