"""Over-generate and select: each rule on a constructed case with a known answer, the pool's determinism and
prefix property, selection from a kept pool, the manifest, and the options' checks."""

import pytest
import torch

from memdistill import selection
from memdistill.baselines import herding_order
from memdistill.cli import main
from memdistill.imageset import read_image_set, to_uint8
from memdistill.sample import SampleConfig, sample_set
from memdistill.selection import choose, confident_order, difficulty_order, kcenter_order, pool_size

from conftest import digits_folder


# ----- the rules on constructed cases ----------------------------------------------------------------------------
def test_kcenter_on_a_line_picks_the_ends_first_then_the_middle():
    xs = torch.tensor([3.0, 0.0, 7.0, 10.0, 5.0, 1.0])  # shuffled points of a line, mean 13/3 nearer 0
    order = kcenter_order(xs[:, None], 3)
    assert order[:2] == [3, 1]  # 10 is farthest from the mean, then 0 farthest from it
    assert order[2] == 4  # 5 is the point farthest from both ends


def test_kcenter_tie_goes_to_the_lowest_row_and_never_repeats():
    pts = torch.tensor([[-1.0], [1.0], [1.0], [-1.0]])  # symmetric: every row as far from the mean
    assert kcenter_order(pts, 4) == [0, 1, 2, 3]


def test_herding_on_a_known_case():
    # mean (0, 0): the first pick is the point nearest the mean; then the one that brings the mean back.
    pts = torch.tensor([[4.0, 0.0], [0.5, 0.0], [-4.0, 0.0], [-0.5, 0.0]])
    assert herding_order(pts, 2) == [1, 3]


def test_confident_keeps_the_highest_probabilities():
    probs = torch.tensor([0.2, 0.9, 0.5, 0.9, 0.1])
    assert confident_order(probs, 3) == [1, 3, 2]


def test_difficulty_matches_the_real_quantiles():
    real = torch.linspace(0, 1, 101)  # real losses uniform on [0, 1]: bin medians 0.25 and 0.75 for k = 2
    candidates = torch.tensor([0.0, 0.3, 0.5, 0.74, 0.99, 0.2])
    assert difficulty_order(candidates, real, 2) == [5, 3]  # 0.2 nearest 0.25 (0.3 too), 0.74 nearest 0.75
    # k = 1: the real median 0.5
    assert difficulty_order(candidates, real, 1) == [2]
    # all candidates easier than the real data: each bin still gets a distinct one, the nearest unused
    assert difficulty_order(torch.tensor([0.0, 0.01, 0.02]), real, 3) == [2, 1, 0]


class StubJudge:
    """Scores that a test decides: probability of the class = a given number per candidate."""

    def __init__(self, scores):
        self.scores = torch.tensor(scores)

    def probabilities(self, images):
        p = torch.zeros(len(images), 3)
        p[:, 1] = self.scores[: len(images)]
        p[:, 0] = 1 - p[:, 1]
        return p


def test_choose_confident_keeps_what_the_stub_judge_scores_highest():
    images = torch.zeros(5, 1, 8, 8)
    assert choose("confident", images, 1, 2, judge=StubJudge([0.1, 0.7, 0.3, 0.95, 0.2])) == [3, 1]


class FeatureJudge:
    """Features that a test decides: the candidate's index as its feature (so images need not mean anything)."""

    def __init__(self, feats):
        self.feats = torch.tensor(feats, dtype=torch.float64)

    def features(self, images):
        return self.feats[: len(images)]


def test_prototype_tracks_the_real_class_mean_not_the_pools():
    """Candidates at 0, 1, 2, 10 (pool mean 3.25), real mean 9: herding picks 2 first (nearest 3.25),
    prototype picks 10 (nearest 9), then the one that brings the mean of two nearest 9 (2: mean 6)."""
    judge = FeatureJudge([[0.0], [1.0], [2.0], [10.0]])
    images = torch.zeros(4, 1, 8, 8)
    assert choose("herding", images, 0, 1, judge=judge) == [2]
    assert choose("prototype", images, 0, 2, judge=judge, real=torch.tensor([9.0])) == [3, 2]
    with pytest.raises(ValueError, match="mean feature"):
        choose("prototype", images, 0, 1, judge=judge)


def test_random_rule_is_seeded_and_per_class():
    a = choose("random", torch.zeros(10, 1, 2, 2), 0, 4, seed=1)
    assert a == choose("random", torch.zeros(10, 1, 2, 2), 0, 4, seed=1) and len(set(a)) == 4
    assert a != choose("random", torch.zeros(10, 1, 2, 2), 0, 4, seed=2)


@pytest.mark.parametrize("factor, ipc, size", [(1, 10, 10), (2, 3, 6), (1.5, 3, 5), (1.1, 10, 11), (4, 1, 4)])
def test_pool_size_rounds_up(factor, ipc, size):
    assert pool_size(factor, ipc) == size


# ----- pools and sets ------------------------------------------------------------------------------------------
def cfg(model, **kw):
    return SampleConfig(**{**dict(model=str(model), ipc=2, steps=3, seed=0, device="cpu", judge_data="digits",
                                  judge_net="convnet1", judge_epochs=1), **kw})


def from_pool(kept, **kw):
    """Selection from a kept pool: no sampling option, since nothing is sampled."""
    return SampleConfig(**{**dict(from_pool=str(kept), ipc=2, seed=0, device="cpu", judge_data="digits",
                                  judge_net="convnet1", judge_epochs=1), **kw})


def pixels(folder):
    x, y, _, m = read_image_set(folder)
    return to_uint8(x).int(), y, m


def test_pool_is_batch_independent_and_its_prefix_is_the_plain_set(tiny_model, tmp_path):
    plain, _, _ = pixels(sample_set(cfg(tiny_model), tmp_path / "plain"))
    sample_set(cfg(tiny_model, pool=2.5, select="random", keep_pool=str(tmp_path / "pool1"), batch_size=1),
               tmp_path / "s1")
    sample_set(cfg(tiny_model, pool=2.5, select="random", keep_pool=str(tmp_path / "pool7"), batch_size=7),
               tmp_path / "s7")
    p1, y1, m1 = pixels(tmp_path / "pool1")
    p7, y7, _ = pixels(tmp_path / "pool7")
    assert m1["counts"] == [5] * 10 and torch.equal(y1, y7)
    # batched kernels round differently: a pixel at a rounding boundary may move by one level (test_sample)
    assert (p1 - p7).abs().max() <= 1 and (p1 == p7).float().mean() > 0.99
    first = torch.cat([(y1 == c).nonzero().flatten()[:2] for c in range(10)])
    assert (p1[first] - plain).abs().max() <= 1 and (p1[first] == plain).float().mean() > 0.99
    s1, _, m = pixels(tmp_path / "s1")
    kept = m["selection"]["kept"]
    assert len(kept) == 10 and all(len(k) == 2 and len(set(k)) == 2 and max(k) < 5 for k in kept)
    picked = torch.cat([(y1 == c).nonzero().flatten()[torch.tensor(k)] for c, k in enumerate(kept)])
    assert torch.equal(s1, p1[picked])  # the set is the kept candidates, in pick order
    assert m["ipc"] == 2 and m["config"]["pool"] == 2.5 and m["config"]["select"] == "random"
    assert m["selection"]["rule"] == "random" and m["selection"]["pool_size"] == 5
    assert m["selection"]["pool"] == str((tmp_path / "pool1").resolve()) and m["selection"]["judge"] is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no hidden pool or partial left


def test_rules_compared_on_one_kept_pool(tiny_model, tmp_path):
    pool = tmp_path / "pool"
    sample_set(cfg(tiny_model, pool=2, select="kcenter", keep_pool=str(pool)), tmp_path / "kc")
    again = sample_set(from_pool(pool, select="kcenter", judge_cache=str(tmp_path / "jc")),
                       tmp_path / "kc2")
    a, _, ma = pixels(tmp_path / "kc")
    b, _, mb = pixels(again)
    assert torch.equal(a, b) and ma["selection"]["kept"] == mb["selection"]["kept"]
    judge = mb["selection"]["judge"]
    assert judge["data"] == "digits:train" and judge["net"] == "convnet1" and judge["epochs"] == 1
    assert judge["file"] == str(tmp_path / "jc" / f"{judge['key']}.pt")  # --judge-cache
    for rule in ("herding", "prototype", "confident", "difficulty"):
        m = pixels(sample_set(from_pool(pool, select=rule), tmp_path / rule))[2]
        assert m["selection"]["rule"] == rule and m["selection"]["judge"]["key"] == judge["key"]
        assert all(len(k) == 2 and max(k) < 4 for k in m["selection"]["kept"])


def test_confident_through_a_pool_keeps_the_stub_judges_favourites(tiny_model, tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    sample_set(cfg(tiny_model, pool=2, select="random", keep_pool=str(pool), classes="0,1,2"), tmp_path / "r")

    class Stub(StubJudge):
        spec = type("Spec", (), {"class_names": ("0", "1", "2")})

        def identity(self):
            return {"stub": True}

        def probabilities(self, images):  # candidate j of every class scores (j * 7 % 4) / 4
            p = torch.zeros(len(images), 3)
            p[:] = (torch.arange(len(images)) * 7 % 4 / 4.0)[:, None]
            return p

    monkeypatch.setattr(selection, "_judge_for", lambda *a, **k: (Stub([]), {}))
    m = pixels(sample_set(from_pool(pool, select="confident"), tmp_path / "c"))[2]
    # scores of candidates 0..3: 0, 0.75, 0.5, 0.25
    assert m["selection"]["kept"] == [[1, 2]] * 3 and m["selection"]["judge"] == {"stub": True}


@pytest.mark.parametrize("args, message", [
    (["--pool", "0.5", "--select", "random"], "--pool must be a finite number >= 1"),
    (["--pool", "nan", "--select", "random"], "--pool must be a finite number >= 1"),
    (["--pool", "2"], "--pool needs a selection rule: give --select"),
    (["--select", "best"], "--select: unknown rule 'best'; allowed: none, random, herding"),
    (["--from-pool", "x"], "--from-pool needs a selection rule"),
    (["--select", "random", "--from-pool", "x", "--keep-pool", "y"], "give one of them"),
    (["--select", "kcenter", "--judge-epochs", "0"], "--judge-epochs must be an integer >= 1"),
])
def test_bad_selection_options_are_one_line(tmp_path, capsys, args, message):
    assert main(["sample", *args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_pool_smaller_than_ipc_is_refused(tiny_model, tmp_path, capsys):
    sample_set(cfg(tiny_model, ipc=1, pool=2, select="random", keep_pool=str(tmp_path / "pool")), tmp_path / "s")
    assert main(["sample", "--from-pool", str(tmp_path / "pool"), "--select", "random", "--ipc", "3",
                 "--out", str(tmp_path / "t")]) == 2
    assert "holds 2 candidates of some class" in capsys.readouterr().err


def test_a_judge_needs_known_data(tiny_model, tmp_path, capsys):
    # the tiny export records no dataset: a judged rule asks for --judge-data
    assert main(["sample", "--model", str(tiny_model), "--steps", "2", "--ipc", "1", "--pool", "2", "--select",
                 "confident", "--out", str(tmp_path / "s")]) == 2
    assert "give --judge-data" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the hidden pool is removed


def test_a_model_trained_on_a_folder_is_judged_on_that_folder(tmp_path):
    """A run folder records its --data: a judged rule needs no --judge-data, also for folder data (it asked for
    it before, after `run` had fine-tuned)."""
    import json

    digits_folder(tmp_path / "data", count=100)
    run = tmp_path / "pt"
    assert main(["pretrain", "--codec", "pixel", "--data", str(tmp_path / "data"), "--model", "DiT-Micro/2",
                 "--steps", "1", "--batch-size", "8", "--no-fidelity", "--no-progress", "--out", str(run)]) == 0
    assert main(["sample", "--model", str(run), "--steps", "2", "--ipc", "1", "--pool", "2", "--select", "prototype",
                 "--judge-epochs", "1", "--no-progress", "--out", str(tmp_path / "s")]) == 0
    judge = json.loads((tmp_path / "s" / "manifest.json").read_text())["selection"]["judge"]
    assert str(tmp_path / "data") in json.dumps(judge)


def test_run_takes_the_pool_and_rule_as_sample_options():
    from memdistill.cli import build_parser
    from memdistill.errors import UserError
    from memdistill.options import config_from_args
    from memdistill.run import RunConfig

    args = build_parser().parse_args(["run", "--sample-pool", "3", "--sample-select", "kcenter"])
    sample = config_from_args(SampleConfig, args, RunConfig().sample, prefix="sample")
    assert (sample.pool, sample.select) == (3.0, "kcenter")
    with pytest.raises(UserError, match="--sample-pool needs a selection rule: give --sample-select"):
        RunConfig(sample=SampleConfig(pool=2)).validate()


# ----- options checked before anything is sampled ----------------------------------------------------------------
@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling a single image fails the test: the checks under test must come first."""
    from memdistill.diffusion import GaussianDiffusion

    def refuse(*args, **kwargs):
        raise AssertionError("an image was sampled before the options were refused")

    monkeypatch.setattr(GaussianDiffusion, "sample", refuse)


def files(folder):
    return sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("where", ["model", "inside the model", "holding the model"])
def test_keep_pool_over_the_model_is_refused_and_the_model_kept(tiny_model, tmp_path, capsys, no_sampling, where):
    keep = {"model": tiny_model, "inside the model": tiny_model / "pool", "holding the model": tiny_model.parent}[where]
    before = files(tiny_model.parent)
    assert main(["sample", "--model", str(tiny_model), "--keep-pool", str(keep), "--select", "random", "--pool", "2",
                 "--out", str(tmp_path / "s"), "--overwrite"]) == 2
    one_line_error(capsys, f"--keep-pool {keep}", "--model input", "choose another --keep-pool")
    assert files(tiny_model.parent) == before and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--judge-data", "--mode-data"])
def test_keep_pool_over_other_inputs_is_refused(tiny_model, tmp_path, capsys, no_sampling, option):
    data = tmp_path / "data"
    (data / "0").mkdir(parents=True)
    extra = ["--mode-guidance", "0.5"] if option == "--mode-data" else []
    assert main(["sample", "--model", str(tiny_model), "--keep-pool", str(data), "--select", "random", "--pool", "2",
                 option, str(data), *extra, "--out", str(tmp_path / "s"), "--overwrite"]) == 2
    one_line_error(capsys, f"--keep-pool {data} is the {option} input")


def test_an_existing_keep_pool_folder_needs_overwrite(tiny_model, tmp_path, capsys, no_sampling):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    assert main(["sample", "--model", str(tiny_model), "--keep-pool", str(keep), "--select", "random", "--pool", "2",
                 "--out", str(tmp_path / "s")]) == 2
    one_line_error(capsys, f"{keep} already exists", "--overwrite")
    assert (keep / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("keep, out, why", [("s2", "s2", "is"), ("s4pool/inner", "s4pool", "lies inside"),
                                            ("s5", "s5/inner", "holds")])
def test_keep_pool_and_out_must_be_apart(tiny_model, tmp_path, capsys, no_sampling, keep, out, why):
    assert main(["sample", "--model", str(tiny_model), "--keep-pool", str(tmp_path / keep), "--select", "random",
                 "--pool", "2", "--out", str(tmp_path / out)]) == 2
    one_line_error(capsys, f"--keep-pool {tmp_path / keep} {why} --out", "choose another --keep-pool")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    (["--judge-data", "no-such-data"], ["no-such-data"]),
    (["--judge-data", "digits", "--judge-net", "convnetX"], ["--judge-net", "convnetX"]),
    (["--judge-data", "digits", "--judge-cache", "FILE"], ["--judge-cache"]),
    (["--judge-data", "digits", "--mode-guidance", "0.5", "--mode-data", "no-such-modes"], ["no-such-modes"]),
])
def test_what_the_judge_needs_is_checked_before_sampling(tiny_model, tmp_path, capsys, no_sampling, args, words):
    (tmp_path / "file").write_text("x")
    args = [str(tmp_path / "file") if a == "FILE" else a for a in args]
    assert main(["sample", "--model", str(tiny_model), "--ipc", "1", "--pool", "2", "--select", "confident", *args,
                 "--out", str(tmp_path / "s")]) == 2
    one_line_error(capsys, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ----- --from-pool: --pool takes effect, sampling options are refused ----------------------------------------------
def test_from_pool_honours_pool_and_the_manifest_agrees(tiny_model, tmp_path):
    pool = tmp_path / "pool"
    sample_set(cfg(tiny_model, pool=3, select="random", keep_pool=str(pool), classes="0,1"), tmp_path / "r")
    whole = pixels(sample_set(from_pool(pool, select="random"), tmp_path / "all"))[2]
    assert whole["selection"]["pool_size"] == 6
    assert whole["selection"]["pool_factor"] == whole["config"]["pool"] == 3
    part = pixels(sample_set(from_pool(pool, select="random", pool=1.5), tmp_path / "part"))[2]
    assert part["selection"]["pool_size"] == 3 and all(max(k) < 3 for k in part["selection"]["kept"])
    assert part["selection"]["pool_factor"] == part["config"]["pool"] == 1.5
    sampled = pixels(tmp_path / "r")[2]
    assert sampled["selection"]["pool_factor"] == sampled["config"]["pool"] == 3


@pytest.mark.parametrize("args, option", [
    (["--cfg-scale", "2"], "--cfg-scale"), (["--steps", "7"], "--steps"), (["--model", "MODEL"], "--model"),
    (["--cfg-interval", "0,500"], "--cfg-interval"), (["--mode-guidance", "0.3"], "--mode-guidance"),
    (["--classes", "0"], "--classes"),
])
def test_from_pool_refuses_sampling_options(tiny_model, tmp_path, capsys, args, option):
    pool = tmp_path / "pool"
    sample_set(cfg(tiny_model, pool=2, select="random", keep_pool=str(pool), ipc=1, classes="0,1"), tmp_path / "r")
    args = [str(tiny_model) if a == "MODEL" else a for a in args]
    assert main(["sample", "--from-pool", str(pool), "--select", "random", "--ipc", "1", *args,
                 "--out", str(tmp_path / "s")]) == 2
    one_line_error(capsys, option, "--from-pool")
    assert not (tmp_path / "s").exists()


def test_from_pool_smaller_than_the_asked_pool_is_refused(tiny_model, tmp_path, capsys):
    pool = tmp_path / "pool"
    sample_set(cfg(tiny_model, pool=2, select="random", keep_pool=str(pool), ipc=1, classes="0"), tmp_path / "r")
    assert main(["sample", "--from-pool", str(pool), "--select", "random", "--ipc", "1", "--pool", "3",
                 "--out", str(tmp_path / "s")]) == 2
    one_line_error(capsys, "holds 2 candidates", "from 3")


# ----- a rule needs a pool larger than --ipc ----------------------------------------------------------------------
@pytest.mark.parametrize("args", [[], ["--pool", "1"], ["--pool", "1.0000000001"]])
def test_a_rule_without_a_larger_pool_is_refused(tmp_path, capsys, args):
    assert main(["sample", "--select", "confident", *args, "--out", str(tmp_path / "s")]) == 2
    one_line_error(capsys, "--pool F > 1")
    assert list(tmp_path.iterdir()) == []
