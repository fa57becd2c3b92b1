import math

import pytest
import torch

from memdistill.diffusion import GaussianDiffusion, image_generator, linear_betas, respaced_timesteps
from memdistill.errors import UserError


def test_linear_schedule_endpoints_and_abar():
    b = linear_betas()
    assert len(b) == 1000 and b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    d = GaussianDiffusion()
    abar = d.base.alphas_cumprod
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    assert abar[-1].item() == pytest.approx(torch.prod(1 - b).item())
    assert abar[-1].item() < 1e-4  # nearly pure noise at the end


def test_q_sample_and_predict_x0_are_inverse():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 4, 4, generator=g)
    noise = torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    xt = d.q_sample(x0, t, noise)
    abar = d.base.alphas_cumprod[500].item()
    assert torch.allclose(xt[2], math.sqrt(abar) * x0[2] + math.sqrt(1 - abar) * noise[2], atol=1e-6)
    assert torch.allclose(d.predict_x0(xt, t, noise), x0, atol=1e-3)


def test_respacing_keeps_original_abar():
    ts = respaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999
    d = GaussianDiffusion()
    s = d.respaced(50)
    assert torch.allclose(s.alphas_cumprod, d.base.alphas_cumprod[ts])
    assert s.timesteps.tolist() == ts
    assert respaced_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(UserError):
        respaced_timesteps(1000, 0)


def _oracle(d: GaussianDiffusion, target: torch.Tensor, learned: bool):
    """A model that knows the data is the single point ``target``: its eps is exact, and its variance
    channel (-1) selects the true posterior variance."""

    def fn(x, t, y):
        abar = d.base.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * target) / (1 - abar).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], 1) if learned else eps

    return fn


def test_hybrid_loss_is_zero_for_the_oracle_and_vb_trains_only_variance():
    d = GaussianDiffusion()
    target = torch.full((1, 2, 4, 4), 0.3)
    x0 = target.expand(4, -1, -1, -1)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 50, 400, 999])
    terms = d.training_losses(_oracle(d, target, learned=True), x0, t, torch.zeros(4, dtype=torch.long), noise)
    assert terms["mse"].max().item() < 1e-8
    # true mean and true variance: the KL term vanishes
    assert terms["vb"].abs().max().item() < 1e-4
    assert torch.allclose(terms["pred_x0"], x0, atol=1e-3)

    # The bound must not push gradient into the eps channels (the mean is detached).
    out = torch.zeros(2, 4, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, tt, y: out, x0[:2], t[1:3], torch.zeros(2, dtype=torch.long), noise[:2])
    terms["vb"].sum().backward()
    assert out.grad[:, :2].abs().max().item() == 0.0 and out.grad[:, 2:].abs().max().item() > 0.0


def test_vb_known_value_for_fixed_wrong_variance():
    """With the exact mean and the variance at beta_t (frac = +1), the KL is the closed form of two
    Gaussians with equal means."""
    d = GaussianDiffusion()
    target = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([1])  # early: beta and the posterior variance differ most
    fn = _oracle(d, target, learned=True)

    def wrong_var(x, tt, y):
        out = fn(x, tt, y)
        out[:, 1:] = 1.0
        return out

    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    vb = d.training_losses(wrong_var, target, t, torch.zeros(1, dtype=torch.long), noise)["vb"].item()
    lv1 = d.base.posterior_log_variance_clipped[1].item()
    lv2 = math.log(d.base.betas[1].item())
    expected = 0.5 * (-1 + lv2 - lv1 + math.exp(lv1 - lv2)) / math.log(2)
    assert expected > 0.01 and vb == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_a_single_point(sampler):
    d = GaussianDiffusion()
    target = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)
    gens = [image_generator(0, 0, i) for i in range(3)]
    x = d.sample(_oracle(d, target, learned=True), (1, 4, 4), torch.zeros(3, dtype=torch.long), gens, steps=25,
                 sampler=sampler)
    assert x.shape == (3, 1, 4, 4)
    assert torch.allclose(x, target.expand(3, -1, -1, -1), atol=1e-3)


def test_fixed_variance_model_samples_too():
    d = GaussianDiffusion()
    target = torch.full((1, 1, 2, 2), -0.5)
    x = d.sample(_oracle(d, target, learned=False), (1, 2, 2), torch.zeros(2, dtype=torch.long),
                 [image_generator(1, 0, i) for i in range(2)], steps=10)
    assert torch.allclose(x, target.expand(2, -1, -1, -1), atol=1e-3)


def test_each_image_depends_only_on_its_generator():
    d = GaussianDiffusion()

    def model(x, t, y):  # a non-trivial model mixing in the label, with learned variance
        return torch.cat([0.1 * x + 0.01 * y.view(-1, 1, 1, 1), torch.tanh(x)], 1)

    y = torch.tensor([0, 1, 2, 1])
    full = d.sample(model, (1, 3, 3), y, [image_generator(7, int(c), i) for i, c in enumerate(y)], steps=8)
    one = d.sample(model, (1, 3, 3), y[2:3], [image_generator(7, 2, 2)], steps=8)
    assert torch.equal(full[2:3], one)
    assert not torch.equal(full[1], full[3])  # same class, different index: different images


def test_unknown_sampler_is_a_user_error():
    d = GaussianDiffusion()
    with pytest.raises(UserError, match="ddpm"):
        d.sample(lambda x, t, y: x, (1, 2, 2), torch.zeros(1, dtype=torch.long), [torch.Generator()], sampler="euler")


def test_clip_x0_keeps_pixel_predictions_in_range():
    d = GaussianDiffusion()
    s = d.respaced(10)

    def wild(x, t, y):  # an eps that implies x0 far outside [-1, 1]
        return torch.cat([torch.full_like(x, -3.0), torch.zeros_like(x)], 1)

    x = torch.zeros(2, 1, 2, 2)
    i = torch.tensor([9, 5])
    out = wild(x, s.timesteps[i], None)
    _, _, x0, _ = d.p_mean_variance(s, out, x, i)
    _, _, x0c, epsc = d.p_mean_variance(s, out, x, i, clip_x0=True)
    assert x0.abs().max() > 1.5 and x0c.abs().max() <= 1.0
    # the eps used downstream agrees with the clipped x0
    assert torch.allclose(d.predict_x0(x, i, epsc, s), x0c, atol=1e-5)
    y = d.sample(wild, (1, 2, 2), torch.zeros(2, dtype=torch.long), [image_generator(0, 0, k) for k in range(2)],
                 steps=10, sampler="ddim", clip_x0=True)
    assert y.abs().max() <= 1.0 + 1e-5


def _cheap_model(learned: bool, scale: float = 0.3):
    """A trivially cheap model whose eps depends on x and t (so a wrong timestep shows), with or without
    the variance channels."""

    def fn(x, t, y):
        eps = scale * x + 1e-4 * t.view(-1, 1, 1, 1).float()
        return torch.cat([eps, torch.tanh(x)], 1) if learned else eps

    return fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_one_step_returns_the_clean_prediction_at_the_last_timestep(sampler, learned, clip_x0):
    """One step starts at t = T-1 and returns the model's x0 prediction there (clamped for pixel codecs)."""
    d = GaussianDiffusion()
    shape, y = (1, 2, 3), torch.tensor([0, 2])
    seen = []
    model = _cheap_model(learned)

    def spy(x, t, yy):
        seen.append(t.tolist())
        return model(x, t, yy)

    x = d.sample(spy, shape, y, [image_generator(5, int(c), i) for i, c in enumerate(y)], steps=1, sampler=sampler,
                 clip_x0=clip_x0)
    assert seen == [[999, 999]]
    noise = torch.stack([torch.randn(shape, generator=image_generator(5, int(c), i)) for i, c in enumerate(y)])
    t = torch.full((2,), 999)
    expected = d.predict_x0(noise, t, model(noise, t, y)[:, :1])
    assert expected.abs().max() > 1.5  # so the clamp matters
    if clip_x0:
        expected = expected.clamp(-1.0, 1.0)
    assert torch.allclose(x, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [1, 2, 1000])
def test_samplers_run_at_the_extreme_step_counts(sampler, steps):
    """1, 2 and 1000 steps: the chain visits the right timesteps, and an exact model recovers its point."""
    d = GaussianDiffusion()
    target = torch.tensor([[[0.5, -0.25], [0.75, -0.9]]])
    gens = [image_generator(2, 0, i) for i in range(2)]
    seen = []
    oracle = _oracle(d, target, learned=True)

    def spy(x, t, y):
        seen.append(int(t[0]))
        return oracle(x, t, y)

    x = d.sample(spy, (1, 2, 2), torch.zeros(2, dtype=torch.long), gens, steps=steps, sampler=sampler)
    assert seen == {1: [999], 2: [999, 0], 1000: list(range(999, -1, -1))}[steps]
    assert torch.isfinite(x).all()
    assert torch.allclose(x, target.expand(2, -1, -1, -1), atol=1e-3)
    if steps > 1:  # a plain model, learned variance: the noise of the inner steps stays finite
        y = d.sample(_cheap_model(True, 0.01), (1, 2, 2), torch.zeros(2, dtype=torch.long), gens, steps=steps,
                     sampler=sampler)
        assert torch.isfinite(y).all()


def test_one_step_schedule_constants_are_finite():
    s = GaussianDiffusion().respaced(1)
    assert s.timesteps.tolist() == [999]
    for name in ("alphas_cumprod", "posterior_log_variance_clipped", "log_variance_large", "posterior_mean_coef1",
                 "posterior_mean_coef2"):
        assert torch.isfinite(getattr(s, name)).all() and len(getattr(s, name)) == 1, name


def _reference_respacing(num_timesteps: int, steps: int) -> list[int]:
    """improved-diffusion's one-section respacing, re-derived literally: round the running float position,
    then advance it by the float stride."""
    stride = 1.0 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    picks = []
    position = 0.0
    i = 0
    while i < steps:
        picks.append(round(position))
        position = position + stride
        i += 1
    return sorted(set(picks))


def test_respacing_equals_the_reference_rule_for_every_step_count():
    differ = [n for n in range(2, 1001) if respaced_timesteps(1000, n) != _reference_respacing(1000, n)]
    assert differ == []
    # counts where rounding i * stride gives another list (the rule is not the naive one)
    assert respaced_timesteps(1000, 21) != sorted({round(i * 999 / 20) for i in range(21)})
    # other schedule lengths too
    for total in (10, 100, 4000):
        for n in range(2, min(total, 300) + 1):
            assert respaced_timesteps(total, n) == _reference_respacing(total, n), (total, n)


def test_one_step_respacing_is_the_documented_deviation():
    """Their rule takes timestep 0 for one step; we take T-1 (one step returns the clean prediction)."""
    assert _reference_respacing(1000, 1) == [0]
    assert respaced_timesteps(1000, 1) == [999]
