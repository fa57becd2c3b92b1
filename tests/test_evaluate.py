import math

import pytest
import torch
from sklearn.datasets import load_digits

from memdistill.errors import UserError
from memdistill.evaluate import (EvalConfig, epochs_for_ipc, evaluate_repeats, format_table,
                                 images_per_class, lr_at, lr_milestones, resolved_epochs, train_and_test)


@pytest.fixture(scope="module")
def digits():
    """sklearn digits as 1x8x8 images in [-1, 1]: 30 train and 40 test images per class."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16 * 2 - 1  # (1797, 1, 8, 8)
    y = torch.tensor(data.target)
    train, test = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        train.append(idx[:30])
        test.append(idx[30:70])
    train, test = torch.cat(train), torch.cat(test)
    return x[train], y[train], x[test], y[test]


def test_epochs_for_ipc_table():
    table = {1: 3000, 10: 2000, 11: 1500, 50: 1500, 51: 1000, 200: 1000, 201: 500, 500: 500, 501: 300}
    assert {ipc: epochs_for_ipc(ipc) for ipc in table} == table
    with pytest.raises(UserError):
        epochs_for_ipc(0)


def test_lr_schedule_300_epochs():
    assert lr_milestones(300) == (200, 250)
    lrs = [lr_at(e, 300, 0.01) for e in (0, 199, 200, 249, 250, 299)]
    assert lrs == pytest.approx([0.01, 0.01, 0.002, 0.002, 0.0004, 0.0004])
    assert lr_milestones(3000) == (2000, 2500)


def test_train_and_test_learns_digits(digits):
    config = EvalConfig(net="convnet2", epochs=12, eval_every=4)
    result = train_and_test(*digits, num_classes=10, config=config, seed=0)
    assert [e for e, _ in result["history"]] == [4, 8, 12]
    assert result["last"] == result["history"][-1][1]
    assert result["best"] == max(acc for _, acc in result["history"])
    assert result["best"] > 50  # chance is 10%
    # same seed, same run
    again = train_and_test(*digits, num_classes=10, config=config, seed=0)
    assert again["history"] == result["history"]


def test_eval_every_default_and_resize(digits):
    train_x, train_y, test_x, test_y = digits
    config = EvalConfig(net="convnet1", epochs=3, image_size=6, cutmix_beta=0, flip=False, jitter=False,
                        lighting=False)
    result = train_and_test(train_x[::10], train_y[::10], test_x[::10], test_y[::10], 10, config, seed=1)
    assert [e for e, _ in result["history"]] == [1, 2, 3]  # epochs // 10 == 0 -> every epoch


def test_evaluate_repeats_seeds_and_stats(digits):
    train_x, train_y, test_x, test_y = digits
    config = EvalConfig(net="convnet1", epochs=2, repeats=3, seed=5)
    out = evaluate_repeats(train_x[::3], train_y[::3], test_x, test_y, 10, config)
    assert [r["seed"] for r in out["per_repeat"]] == [5, 6, 7]
    best = [r["best"] for r in out["per_repeat"]]
    last = [r["last"] for r in out["per_repeat"]]
    assert len(set(best)) > 1  # different seeds train differently
    mean = sum(best) / 3
    assert out["best_mean"] == pytest.approx(mean)
    assert out["best_std"] == pytest.approx(math.sqrt(sum((b - mean) ** 2 for b in best) / 2))  # ddof=1
    assert out["last_mean"] == pytest.approx(sum(last) / 3)
    assert out["epochs"] == 2 and out["net"] == "convnet1"
    table = format_table(out)
    assert table.count("\n") == 2 and f"{out['best_mean']:.2f} ± {out['best_std']:.2f}" in table

    one = evaluate_repeats(train_x[::3], train_y[::3], test_x, test_y, 10,
                           EvalConfig(net="convnet1", epochs=1, repeats=1))
    assert one["best_std"] == 0.0 and one["last_std"] == 0.0
    assert one["epochs"] == 1


def test_default_epochs_follow_ipc():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])  # IPC = largest class = 3
    assert images_per_class(labels) == 3
    assert resolved_epochs(EvalConfig(), labels) == 2000
    assert resolved_epochs(EvalConfig(), torch.arange(10)) == 3000
    assert resolved_epochs(EvalConfig(), torch.arange(10).repeat(60)) == 1000
    assert resolved_epochs(EvalConfig(epochs=7), labels) == 7


def test_validation_errors(digits):
    train_x, train_y, test_x, test_y = digits
    cfg = EvalConfig(net="convnet1", epochs=1)
    with pytest.raises(UserError, match="empty"):
        train_and_test(train_x[:0], train_y[:0], test_x, test_y, 10, cfg)
    with pytest.raises(UserError, match="labels must lie"):
        train_and_test(train_x, train_y, test_x, test_y, 9, cfg)
    with pytest.raises(UserError, match="classes"):
        train_and_test(train_x[train_y < 5], train_y[train_y < 5], test_x, test_y, 10, cfg)
    with pytest.raises(UserError, match="channels"):
        train_and_test(train_x, train_y, test_x.repeat(1, 3, 1, 1), test_y, 10, cfg)
    with pytest.raises(UserError, match="too small"):  # 8 px cannot take 4 halvings
        train_and_test(train_x, train_y, test_x, test_y, 10, EvalConfig(net="convnet4", epochs=1))
    with pytest.raises(UserError, match="unknown net"):
        train_and_test(train_x, train_y, test_x, test_y, 10, EvalConfig(net="mlp", epochs=1))
    with pytest.raises(UserError, match="repeats"):
        evaluate_repeats(train_x, train_y, test_x, test_y, 10, EvalConfig(repeats=0))


def test_batch_norm_never_sees_a_batch_of_one(digits):
    # 9 images in batches of 4 would leave a last batch of 1, which batch norm at 1x1 cannot train on.
    train_x, train_y, test_x, test_y = digits
    idx = torch.cat([(train_y == c).nonzero()[:3].flatten() for c in range(3)])
    test_idx = test_y < 3
    config = EvalConfig(net="resnet18", norm="batch", epochs=1, batch_size=4, cutmix_beta=0)
    result = train_and_test(train_x[idx], train_y[idx], test_x[test_idx], test_y[test_idx], 10, config)
    assert result["history"][0][0] == 1


def test_one_repeat_is_shown_as_one_repeat(digits):
    from memdistill.evaluate import format_score
    from memdistill.reports import pm

    train_x, train_y, test_x, test_y = digits
    one = evaluate_repeats(train_x[::3], train_y[::3], test_x, test_y, 10,
                           EvalConfig(net="convnet1", epochs=1, repeats=1))
    table = format_table(one)
    assert f"{one['best_mean']:.2f} (1 repeat)" in table and "±" not in table
    assert format_score(91.6, 0.0, 1) == "91.60 (1 repeat)" == pm(91.6, 0.0, 1)
    assert format_score(91.6, 1.21, 3) == "91.60 ± 1.21" == pm(91.6, 1.21)


def _digit_tree(root, class_names, per_class=12):
    """A plain class-per-folder PNG tree (no manifest) of digits train images."""
    from PIL import Image

    from memdistill.data import open_dataset

    ds = open_dataset("digits", "train")
    for name in class_names:
        (root / name).mkdir(parents=True)
        idx = (ds.targets == int(name)).nonzero().flatten()[:per_class]
        for i in idx.tolist():
            pixels = ((ds.images[i, 0] + 1) * 127.5).round().byte().numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_evaluate_accepts_a_plain_class_tree_in_the_test_order(tmp_path, capsys):
    """Issue 9.20: any class-per-folder tree; labels by folder name, in the test set's class order; the row is
    labelled by the folder; one repeat is shown as one repeat."""
    from memdistill.cli import main

    tree = _digit_tree(tmp_path / "fullsplit", ["0", "1"])
    order = tmp_path / "order.txt"
    order.write_text("1\n0\n")  # the test set lists the classes the other way round
    out = tmp_path / "e"
    assert main(["evaluate", "--train", str(tree) + "/", "--test", "digits", "--subset", str(order),
                 "--net", "convnet1", "--epochs", "15", "--repeats", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = __import__("json").loads((out / "results.json").read_text())
    assert result["method"] == "fullsplit" and "| fullsplit |" in printed
    assert result["best_mean"] > 90  # labels swapped by folder order would score near 0
    assert "(1 repeat)" in printed and "± 0.00" not in printed
    assert result["ipc"] == 12


def test_evaluate_tree_with_other_classes_is_refused(tmp_path, capsys):
    from memdistill.cli import main

    tree = _digit_tree(tmp_path / "t", ["0", "1"])
    (tree / "1").rename(tree / "one")
    order = tmp_path / "order.txt"
    order.write_text("0\n1\n")
    assert main(["evaluate", "--train", str(tree), "--test", "digits", "--subset", str(order), "--repeats", "1",
                 "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "not in both: 1, one" in err and "same class" in err


def test_evaluation_defaults_to_the_device_every_stage_uses(capsys):
    """auto (CUDA when available), in evaluate and inside run and bench: a GPU machine is used without asking."""
    from memdistill.bench import BenchConfig
    from memdistill.cli import main
    from memdistill.devices import resolve_device
    from memdistill.run import RunConfig

    assert EvalConfig().device == RunConfig().eval.device == BenchConfig().eval.device == "auto"
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "(default: auto)" in " ".join(capsys.readouterr().out.split())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(EvalConfig().device).type == expected


def test_bf16_training_on_a_cpu_runs_channels_last_and_fp32_stays_nchw(digits, monkeypatch):
    import memdistill.evaluate as ev

    built = []
    real_build = ev.build_net
    monkeypatch.setattr(ev, "build_net", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    train_x, train_y, test_x, test_y = digits
    for precision in ("bf16", "fp32"):
        config = EvalConfig(net="convnet2", epochs=6, eval_every=3, precision=precision, device="cpu")
        result = train_and_test(train_x, train_y, test_x, test_y, 10, config, seed=0)
        assert result["best"] > 30, precision  # it learns in either layout (chance is 10%)
    conv_bf16 = built[0].features[4].weight  # the second conv: a 1-channel input fits both layouts
    conv_fp32 = built[1].features[4].weight
    assert conv_bf16.is_contiguous(memory_format=torch.channels_last) and not conv_bf16.is_contiguous()
    assert conv_fp32.is_contiguous()
