"""Reference accuracies: trained on the right images, cached with their config, reused when it matches and
trained again when any keyed part changes."""

import json
from dataclasses import replace

import pytest
import torch

from memdistill import references
from memdistill.errors import UserError
from memdistill.evaluate import EvalConfig
from memdistill.references import ScoreConfig, open_references, references_cache, score_set, without_augmentation

TINY = EvalConfig(net="convnet1", epochs=1, repeats=2, batch_size=128)


@pytest.fixture
def trained(monkeypatch):
    """Every classifier set the references train: (number of images, labels, config)."""
    calls = []
    real = references.evaluate_repeats

    def counting(x, y, tx, ty, k, config):
        calls.append((len(x), y.clone(), config))
        return real(x, y, tx, ty, k, config)

    monkeypatch.setattr(references, "evaluate_repeats", counting)
    return calls


def refs(cache):
    return open_references("digits", "digits", "test", None, 8, 1, cache)


def test_references_train_on_the_right_images(tmp_path, trained):
    r = refs(tmp_path)
    full = r.full_data(TINY, epochs=1)
    rand = r.random_real(TINY, ipc=3)
    (n_full, y_full, c_full), (n_rand, y_rand, c_rand) = trained
    assert n_full == len(r.train_ds) and c_full.epochs == 1
    assert n_rand == 30 and torch.equal(torch.bincount(y_rand), torch.full((10,), 3))
    assert c_rand.flip is False  # the digit sets' protocol: no flip, as for the set itself
    assert len(full["per_repeat"]) == len(rand["per_repeat"]) == 2


def test_cache_is_reused_and_invalidated(tmp_path, trained):
    first = refs(tmp_path).full_data(TINY, epochs=1)
    # A new session with the same config reads the stored result: no training.
    assert refs(tmp_path).full_data(TINY, epochs=1) == first and len(trained) == 1
    assert refs(tmp_path).full_data(replace(TINY, device="cpu"), epochs=1) == first and len(trained) == 1
    # Any keyed change trains again: the full-data budget, a protocol setting, the seed, the repeats.
    r = refs(tmp_path)
    for changed in ((TINY, 2), (replace(TINY, lr=0.02), 1), (replace(TINY, seed=5), 1),
                    (replace(TINY, repeats=1), 1), (without_augmentation(TINY, None), 1)):
        before = len(trained)
        r.full_data(changed[0], epochs=changed[1])
        assert len(trained) == before + 1, changed
    # Random references are keyed by IPC too.
    r.random_real(TINY, 2)
    r.random_real(TINY, 2)
    r.random_real(TINY, 3)
    assert len(trained) == 8
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 8 and all("spec" in json.loads(p.read_text()) for p in files)
    # A stored file whose config does not match its name (edited, or damaged) is trained again, then replaced.
    random2 = next(p for p in files if p.name.startswith("random") and json.loads(p.read_text())["spec"]["ipc"] == 2)
    data = json.loads(random2.read_text())
    data["spec"]["protocol"]["lr"] = 0.5
    random2.write_text(json.dumps(data))
    r.random_real(TINY, 2)
    assert len(trained) == 9
    random2.write_text("{not json")
    r.random_real(TINY, 2)
    assert len(trained) == 10 and json.loads(random2.read_text())["spec"]["ipc"] == 2


def test_cache_folder_option_environment_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDISTILL_CACHE", str(tmp_path / "env"))
    assert references_cache() == tmp_path / "env" / "references"
    assert references_cache(str(tmp_path / "opt")) == tmp_path / "opt"
    monkeypatch.delenv("MEMDISTILL_CACHE")
    assert references_cache().parts[-3:] == (".cache", "memdistill", "references")


def test_score_set_pairs_the_references_by_repeat(tmp_path, monkeypatch):
    # Stubbed reference accuracies: the scores are arithmetic on them.
    r = refs(tmp_path)
    stub = {"full": [98.0, 96.0], "random": [50.0, 54.0], "random-noaug": [40.0, 42.0]}

    def fake(name):
        return {"per_repeat": [{"best": b} for b in stub[name]], "best_mean": sum(stub[name]) / 2, "best_std": 0.0,
                "epochs": 1}

    monkeypatch.setattr(r, "full_data", lambda config, epochs: fake("full"))
    monkeypatch.setattr(r, "random_real", lambda config, ipc: fake("random" if config.cutmix_beta else "random-noaug"))
    result = {"per_repeat": [{"best": 60.0}, {"best": 70.0}]}
    noaug = {"per_repeat": [{"best": 45.0}, {"best": 43.0}], "best_mean": 44.0, "best_std": 1.4, "epochs": 1}
    s = score_set(result, r, TINY, 2, ScoreConfig(scores=True), noaug_result=noaug)
    assert s["hlr"]["per_repeat"] == [38.0, 26.0] and s["ior"]["per_repeat"] == [10.0, 16.0]
    assert s["full_data"]["per_repeat"] == [98.0, 96.0] and s["random_real"]["best_mean"] == 52.0
    assert "ars" in s and s["ipc"] == 2


@pytest.mark.parametrize("field, value, option", [
    ("full_data_epochs", 0, "--full-data-epochs"), ("lrs_weight", 2.0, "--lrs-weight"),
    ("ars_lambda", float("inf"), "--ars-lambda"), ("score_scaling", "log", "--score-scaling"),
])
def test_bad_score_settings_are_refused(field, value, option):
    with pytest.raises(UserError, match=option):
        replace(ScoreConfig(), **{field: value}).validate()


def test_references_of_other_classes_are_refused(tmp_path):
    from memdistill.data import TensorImageDataset, open_dataset

    other = TensorImageDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), ["cat", "dog"])
    with pytest.raises(UserError, match="same classes"):
        references.References(open_dataset("digits", "train"), other, "pets", tmp_path)


def test_unwritable_cache_is_refused_naming_the_option(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="--references-cache"):
        ScoreConfig(scores=True, references_cache=str(tmp_path / "file")).validate()


def test_evaluate_scores_option_stores_and_prints_them(tmp_path, small_set, capsys):
    import json

    from memdistill.cli import main

    args = ["evaluate", "--train", str(small_set), "--net", "convnet1", "--epochs", "1", "--repeats", "2",
            "--out", str(tmp_path / "ev")]
    assert main(args) == 0
    assert "scores" not in json.loads((tmp_path / "ev" / "results.json").read_text())  # opt-in
    assert main(args + ["--scores", "--ars", "--full-data-epochs", "1", "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "HLR (points)" in printed and "LRS" in printed and "ARS" in printed
    result = json.loads((tmp_path / "ev" / "results.json").read_text())
    s = result["scores"]
    # The set is the random selection with the protocol's seed: the random reference is the same set.
    assert s["ior"]["per_repeat"] == [0.0, 0.0]
    assert s["hlr"]["per_repeat"] == [f - b for f, b in zip(s["full_data"]["per_repeat"],
                                                             [r["best"] for r in result["per_repeat"]])]
    assert s["scaling"] == "fraction" and len(s["ars"]["per_repeat"]) == 2


def test_evaluate_scores_of_a_folder_test_need_reference_data(tmp_path, small_set, capsys):
    from memdistill.cli import main

    assert main(["evaluate", "--train", str(small_set), "--test", str(small_set), "--scores",
                 "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reference-data is required" in err[0]
    assert main(["evaluate", "--train", str(small_set), "--scores", "--lrs-weight", "2",
                 "--out", str(tmp_path / "ev")]) == 2
    assert "--lrs-weight" in capsys.readouterr().err


def test_run_scores_every_set_in_its_report(tiny_model, tmp_path, capsys):
    import json

    from memdistill.cli import main

    out = tmp_path / "run"
    assert main(["run", "--init", str(tiny_model), "--data", "digits", "--steps", "2", "--batch-size", "8", "--ipc",
                 "2", "--sample-steps", "2", "--eval-net", "convnet1", "--eval-epochs", "1", "--eval-repeats", "2",
                 "--no-progress", "--scores", "--full-data-epochs", "1", "--out", str(out)]) == 0
    assert "HLR (points)" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["adaptive", "random"]
    for r in results:
        assert set(r["scores"]) >= {"hlr", "ior", "lrs"} and "ars" not in r["scores"]
    # The random baseline is drawn as the random reference is (the protocol's seed): IOR 0 for it.
    assert results[1]["scores"]["ior"]["mean"] == 0.0
    report = (out / "report.md").read_text()
    assert "### DD-Ranking scores" in report and "| adaptive | 2 | convnet1 |" in report and "on fractions" in report


def test_run_soft_label_ars_reuses_the_runs_teacher(tiny_model, tmp_path, monkeypatch):
    """run --ars with --eval-teacher full: the sets evaluated again without augmentation are labelled by the run's
    teacher (teacher/<net>), neither refused for want of a teacher folder nor given a teacher of their own."""
    import json

    from memdistill import evaluate
    from memdistill.cli import main
    from memdistill.softlabels import sha256_of

    monkeypatch.setattr(evaluate, "TEACHER_EPOCHS", 1)  # the plumbing, not the teacher's quality
    out = tmp_path / "run"
    assert main(["run", "--init", str(tiny_model), "--data", "digits", "--steps", "2", "--batch-size", "8", "--ipc",
                 "1", "--sample-steps", "2", "--eval-net", "convnet1", "--eval-epochs", "1", "--eval-repeats", "1",
                 "--eval-labels", "soft", "--eval-teacher", "full", "--no-progress", "--ars", "--full-data-epochs",
                 "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    random = next(r for r in results if r["method"] == "random")
    noaug = json.loads((out / "eval" / "random-noaug.json").read_text())
    teacher = json.loads((out / "eval" / "random.json").read_text())["teacher"]
    assert noaug["teacher"] == teacher and sha256_of(teacher["path"]) == teacher["sha256"]
    assert random["scores"]["set_noaug"]["per_repeat"] == random["scores"]["random_noaug"]["per_repeat"]


def test_soft_label_scores_follow_ddranking_soft_label_evaluator(tmp_path, monkeypatch):
    # DD-Ranking's soft-label evaluator: HLR = full data (hard labels) - the set with hard labels; IOR = the set with
    # soft labels - random real with soft labels. Stubbed training: each accuracy tells which labels trained it.
    r = refs(tmp_path / "cache")
    calls = []

    def fake(x, y, tx, ty, k, config):
        calls.append(config)
        full = len(x) == len(r.train_ds)
        best = {(True, "hard"): [90.0, 92.0], (True, "soft"): [99.0, 99.0],
                (False, "hard"): [30.0, 30.0], (False, "soft"): [50.0, 52.0]}[full, config.labels]
        return {"per_repeat": [{"best": b} for b in best], "best_mean": sum(best) / 2, "best_std": 0.0, "epochs": 1}

    monkeypatch.setattr(references, "evaluate_repeats", fake)
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"a teacher")
    soft = replace(TINY, labels="soft", teacher=str(teacher), temperature=4.0, soft_lr=0.002)
    set_soft = {"per_repeat": [{"best": 70.0}, {"best": 74.0}]}
    set_hard = {"per_repeat": [{"best": 60.0}, {"best": 62.0}], "best_mean": 61.0, "best_std": 1.4, "epochs": 1}
    s = score_set(set_soft, r, soft, 2, ScoreConfig(scores=True), hard_result=set_hard)
    assert s["hlr"]["per_repeat"] == [30.0, 30.0]  # 90 - 60, 92 - 62
    assert s["ior"]["per_repeat"] == [20.0, 22.0]  # 70 - 50, 74 - 52
    assert s["set_hard"]["per_repeat"] == [60.0, 62.0] and s["full_data"]["per_repeat"] == [90.0, 92.0]
    full_config = next(c for c in calls if c.epochs == ScoreConfig().full_data_epochs)
    assert full_config.labels == "hard" and full_config.teacher is None
    # The full-data reference is the hard-label one: other soft settings, or hard labels, reuse its cache.
    before = len(calls)
    assert r.full_data(replace(soft, temperature=8.0, soft_weight_decay=0.1))["per_repeat"][0]["best"] == 90.0
    assert r.full_data(TINY)["per_repeat"][0]["best"] == 90.0 and len(calls) == before
    with pytest.raises(ValueError, match="hard_result"):
        score_set(set_soft, r, soft, 2, ScoreConfig(scores=True))


def test_evaluate_soft_label_scores_take_the_sets_hard_label_accuracy(tmp_path, small_set, monkeypatch):
    import json

    from memdistill import evaluate
    from memdistill.cli import main

    monkeypatch.setattr(evaluate, "TEACHER_EPOCHS", 1)  # the plumbing, not the teacher's quality
    common = ["--train", str(small_set), "--net", "convnet1", "--epochs", "1", "--repeats", "1"]
    assert main(["evaluate", *common, "--out", str(tmp_path / "hard")]) == 0
    assert main(["evaluate", *common, "--labels", "soft", "--teacher", "full", "--scores", "--full-data-epochs", "1",
                 "--out", str(tmp_path / "soft")]) == 0
    hard = json.loads((tmp_path / "hard" / "results.json").read_text())
    soft = json.loads((tmp_path / "soft" / "results.json").read_text())
    s = soft["scores"]
    assert s["labels"] == "soft" and s["set_hard"]["per_repeat"] == [r["best"] for r in hard["per_repeat"]]
    assert s["hlr"]["per_repeat"] == [s["full_data"]["per_repeat"][0] - hard["per_repeat"][0]["best"]]
    # the set is the random selection with the protocol's seed: the (soft-label) random reference is the same set
    assert s["ior"]["per_repeat"] == [0.0]


def test_soft_label_ars_evaluates_without_augmentation_under_the_sets_own_teacher(tmp_path, small_set, monkeypatch):
    """evaluate --ars with --teacher full: the evaluation without augmentation is labelled by the teacher the
    first one trained (not a second teacher trained without augmentation into the same file, which the
    references would then be labelled by): the random selection scores IOR 0 with and without augmentation."""
    import json

    from memdistill import evaluate
    from memdistill.cli import main
    from memdistill.softlabels import sha256_of

    monkeypatch.setattr(evaluate, "TEACHER_EPOCHS", 1)  # the plumbing, not the teacher's quality
    out = tmp_path / "soft"
    assert main(["evaluate", "--train", str(small_set), "--net", "convnet1", "--epochs", "1", "--repeats", "1",
                 "--labels", "soft", "--teacher", "full", "--ars", "--full-data-epochs", "1", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    s = result["scores"]
    assert sha256_of(result["teacher"]["path"]) == result["teacher"]["sha256"]  # the file was not retrained
    assert s["ior"]["per_repeat"] == [0.0]
    assert s["set_noaug"]["per_repeat"] == s["random_noaug"]["per_repeat"]


def test_hard_label_references_are_not_keyed_by_soft_label_settings(tmp_path, trained):
    r = refs(tmp_path)
    first = r.random_real(TINY, 2)
    for student in (dict(temperature=4.0), dict(soft_lr=0.002), dict(soft_weight_decay=0.1)):
        assert r.random_real(replace(TINY, **student), 2) == first and len(trained) == 1, student
