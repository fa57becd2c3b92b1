import argparse
import json
import os

import pytest
import torch

from memdistill.errors import UserError
from memdistill.models.dit import DiT, build_dit
from memdistill.models.io import (
    dit_kwargs_from_diffusers_config,
    load_dit,
    load_export,
    load_state_dict_any,
    save_diffusers,
    save_export,
    save_official,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny(seed: int = 0, **kw) -> DiT:
    args = dict(input_size=8, in_channels=4, num_classes=10)
    args.update(kw)
    model = build_dit("DiT-Micro/2", **args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 421, 999]), torch.tensor([0, 9, 10])


def test_official_bare_pt_round_trip(tmp_path, batch):
    model = tiny()
    save_official(tmp_path / "dit.pt", model)
    sd = torch.load(tmp_path / "dit.pt", weights_only=True)
    assert set(sd) == set(model.state_dict())
    loaded = load_dit(tmp_path / "dit.pt")  # architecture inferred from shapes
    assert loaded.config == model.config
    assert torch.equal(loaded(*batch), model(*batch))


def test_training_checkpoint_prefers_ema(tmp_path, batch):
    model, ema = tiny(seed=0), tiny(seed=1)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(lr=1e-4)}
    torch.save(ckpt, tmp_path / "0012000.pt")
    loaded = load_dit(tmp_path / "0012000.pt")
    assert torch.equal(loaded(*batch), ema(*batch))
    assert not torch.allclose(loaded(*batch), model(*batch))


def test_diffusers_folder_round_trip(tmp_path, batch):
    model = tiny()
    save_diffusers(tmp_path / "hf", model)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["_class_name"] == "DiTTransformer2DModel"
    assert dit_kwargs_from_diffusers_config(cfg) == {
        k: v for k, v in vars(model.config).items()
    }
    loaded = load_dit(tmp_path / "hf")
    assert torch.equal(loaded(*batch), model(*batch))


def _diffusers_dit(seed: int):
    from diffusers import DiTTransformer2DModel

    net = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        # A converted official model shares one embedder: every block holds the same copy.
        emb0 = net.transformer_blocks[0].norm1.emb.state_dict()
        for block in net.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0)
    return net


def test_diffusers_model_converts_to_same_outputs(tmp_path, batch):
    net = _diffusers_dit(seed=2)
    net.save_pretrained(str(tmp_path / "hf"))
    ours = load_dit(tmp_path / "hf")
    out = ours(*batch)
    with torch.no_grad():
        shifted = net(batch[0], timestep=batch[1], class_labels=batch[2]).sample
        # diffusers' timestep projection divides by half - 1 (shift 1); the official model by half.
        for block in net.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        theirs = net(batch[0], timestep=batch[1], class_labels=batch[2]).sample
    assert out.shape == theirs.shape == (3, 8, 8, 8)
    assert torch.allclose(out, theirs, atol=1e-5)
    assert (out - shifted).abs().max() > 1e-4  # the documented difference is real


def test_shape_mismatch_names_key(tmp_path):
    save_official(tmp_path / "dit.pt", tiny())
    with pytest.raises(UserError, match=r"y_embedder\.embedding_table\.weight.*\(11, 64\).*\(13, 64\)"):
        load_dit(tmp_path / "dit.pt", num_classes=12)
    sd = tiny().state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(UserError, match=r"missing key 'blocks\.1\.mlp\.fc2\.bias'"):
        load_dit(tmp_path / "broken.pt")
    with pytest.raises(UserError, match="unknown DiT argument 'heads'"):
        load_dit(tmp_path / "dit.pt", heads=3)


def test_export_round_trip_with_difffit(tmp_path, batch):
    model = tiny()
    model.enable_difffit()
    with torch.no_grad():
        model.blocks[0].difffit_attn.uniform_(0.5, 1.5)
        model.blocks[0].difffit_mlp.uniform_(0.5, 1.5)
    ref = model(*batch)
    out_dir = tmp_path / "export"
    save_export(out_dir, model, {"step": 12, "classes": ["a", "b"]})
    save_export(out_dir, model, {"step": 13})  # overwriting an existing export works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no tmp folders left
    loaded, cfg = load_export(out_dir)
    assert cfg["step"] == 13 and cfg["model"]["difffit"] is True and cfg["model"]["hidden_size"] == 64
    assert loaded.difffit_enabled
    assert torch.equal(loaded(*batch), ref)
    assert torch.equal(load_dit(out_dir)(*batch), ref)
    # The official layout has no DiffFit keys: the scales are folded into the adaLN gates.
    save_official(tmp_path / "folded.pt", model)
    folded = load_state_dict_any(tmp_path / "folded.pt")
    assert not any("difffit" in k for k in folded)
    assert torch.allclose(load_dit(tmp_path / "folded.pt")(*batch), ref, atol=1e-5)


def test_export_errors(tmp_path):
    with pytest.raises(UserError, match="not an export folder"):
        load_export(tmp_path)
    with pytest.raises(UserError, match="not a DiT folder"):
        load_dit(tmp_path)
    with pytest.raises(UserError, match="'model'"):
        save_export(tmp_path / "x", tiny(), {"model": 1})
