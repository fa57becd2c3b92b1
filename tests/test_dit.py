import math
import os

import pytest
import torch

from memdistill.errors import UserError
from memdistill.models.dit import (
    DIT_CONFIGS,
    DiT,
    build_dit,
    dit_config,
    guided,
    set_trainable,
    sincos_pos_embed_2d,
    timestep_embedding,
    trainable_parameter_names,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def micro(**kw) -> DiT:
    args = dict(input_size=8, in_channels=4, num_classes=10)
    args.update(kw)
    return build_dit("DiT-Micro/2", **args)


def randomise(model: DiT, seed: int = 0) -> DiT:
    """Non-zero weights everywhere (a fresh model has zeroed adaLN and final layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed" and "difffit" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(n=3, c=4, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    t = torch.tensor([0, 500, 999][:n])
    y = torch.tensor([0, 7, 3][:n])
    return x, t, y


def test_xl2_parameter_count_on_meta():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    assert model.pos_embed.device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


@pytest.mark.parametrize("learn_sigma,channels", [(True, 8), (False, 4)])
def test_fresh_model_outputs_exact_zeros(learn_sigma, channels):
    torch.manual_seed(0)
    model = micro(learn_sigma=learn_sigma)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, channels, 8, 8)
    assert torch.count_nonzero(out) == 0
    assert model.out_channels == channels


def test_state_dict_keys_match_official_layout():
    model = micro()
    expected = {
        "pos_embed",
        "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }
    for i in range(2):
        for mod in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
    sd = model.state_dict()
    assert set(sd) == expected
    assert sd["y_embedder.embedding_table.weight"].shape == (11, 64)  # 10 classes + null
    assert sd["pos_embed"].shape == (1, 16, 64)
    assert not model.pos_embed.requires_grad
    assert micro(class_dropout_prob=0.0).state_dict()["y_embedder.embedding_table.weight"].shape == (10, 64)
    assert model.null_label == 10


def test_timestep_embedding_known_values():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    # k = 1: f = 10000^(-1/128); cos half first.
    f1 = math.exp(-math.log(10000) / 128)
    assert emb[1, 1].item() == pytest.approx(math.cos(3 * f1), abs=1e-6)
    assert emb[1, 129].item() == pytest.approx(math.sin(3 * f1), abs=1e-6)


def test_pos_embed_matches_mae_recipe():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_pos_embed_2d(64, 4)
    theirs = get_2d_sincos_pos_embed(64, 4, base_size=4)
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-6)
    # token 1 is row 0, column 1: the first half encodes the column -> sin(1 * w_0) = sin(1).
    assert ours[1, 0].item() == pytest.approx(math.sin(1.0))
    assert ours[1, 32].item() == pytest.approx(0.0)


def test_unpatchify_order():
    model = micro()
    n, g, p, c = 1, 4, 2, model.out_channels
    tokens = torch.arange(n * g * g * p * p * c, dtype=torch.float32).reshape(n, g * g, p * p * c)
    img = model.unpatchify(tokens)
    # token (i, j) holds (p_row, p_col, channel) in that order.
    i, j, pr, pc, ch = 2, 3, 1, 0, 5
    assert img[0, ch, i * p + pr, j * p + pc] == tokens[0, i * g + j, (pr * p + pc) * c + ch]


def test_difffit_identity_at_init():
    model = randomise(micro()).eval()
    x, t, y = inputs()
    before = model(x, t, y)
    assert before.abs().max() > 1e-3
    model.enable_difffit()
    after = model(x, t, y)
    assert torch.equal(before, after)
    keys = {k for k in model.state_dict() if "difffit" in k}
    assert keys == {"blocks.0.difffit_attn", "blocks.0.difffit_mlp"}  # first half of depth 2
    with torch.no_grad():
        model.blocks[0].difffit_attn.mul_(2.0)
    assert not torch.allclose(model(x, t, y), before)


def test_set_trainable_difffit_xl2_on_meta():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2")
    count = set_trainable(model, "difffit")
    # biases 489,632 + label table 1001 x 1152 + 14 blocks x 2 x 1152 scales
    assert count == 1_675_040
    assert 1.5e6 < count < 2.0e6
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def test_set_trainable_names():
    model = micro()
    set_trainable(model, "difffit")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.qkv.bias" in trainable and "blocks.0.attn.qkv.weight" not in trainable
    assert "y_embedder.embedding_table.weight" in trainable
    assert {"blocks.0.difffit_attn", "blocks.0.difffit_mlp"} <= trainable
    assert "pos_embed" not in trainable and "t_embedder.mlp.0.weight" not in trainable
    assert trainable == set(trainable_parameter_names(model, "difffit"))
    total = set_trainable(model, "all")
    assert total == sum(p.numel() for p in model.parameters()) - model.pos_embed.numel()
    assert not model.pos_embed.requires_grad
    with pytest.raises(UserError, match="difffit, all"):
        set_trainable(model, "lora")


def test_label_dropout_uses_null_row():
    model = randomise(micro()).eval()
    x, t, y = inputs()
    dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
    expected = model(x, t, torch.tensor([10, 7, 10]))
    assert torch.equal(dropped, expected)
    assert not torch.allclose(dropped[0], model(x, t, y)[0])
    # training mode: the drop mask is torch.rand(N) < p from the given generator
    model.train()
    model.y_embedder.dropout_prob = 0.5
    out = model(x, t, y, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(3, generator=torch.Generator().manual_seed(3)) < 0.5
    model.eval()
    assert torch.allclose(out, model(x, t, torch.where(mask, 10, y)), atol=1e-6)


def test_guided():
    model = randomise(micro()).eval()
    x, t, y = inputs()
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, model.null_label))
    assert torch.equal(guided(model, 1.0)(x, t, y), cond)
    out = guided(model, 4.0)(x, t, y)
    assert out.shape == cond.shape
    assert torch.allclose(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5)
    assert torch.allclose(out[:, 4:], cond[:, 4:], atol=1e-6)  # learned variance from the conditional half
    out3 = guided(model, 4.0, guided_channels=3)(x, t, y)
    assert torch.allclose(out3[:, :3], out[:, :3], atol=1e-6)
    assert torch.allclose(out3[:, 3], cond[:, 3], atol=1e-6)
    with pytest.raises(UserError):
        guided(model, 4.0, guided_channels=5)
    with pytest.raises(UserError):
        guided(micro(class_dropout_prob=0.0), 4.0)


def test_registry_and_config():
    assert {"DiT-XL/2", "DiT-XL/4", "DiT-XL/8", "DiT-L/2", "DiT-B/4", "DiT-S/8", "DiT-Mini/2", "DiT-Micro/4"} <= set(
        DIT_CONFIGS
    )
    assert DIT_CONFIGS["DiT-B/4"] == dict(depth=12, hidden_size=768, num_heads=12, patch_size=4)
    with pytest.raises(UserError, match="DiT-XL/2"):
        build_dit("DiT-XXL/2")
    model = micro(learn_sigma=False)
    cfg = dit_config(model)
    assert cfg == dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                       mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=False)
    rebuilt = DiT(**cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
