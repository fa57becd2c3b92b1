import math

import pytest
import torch

from memdistill.losses import cosine_matrix, diversity_loss, memory_loss, representativeness_loss
from memdistill.memory import ClassMemories

E1, E2, E3 = torch.eye(3)


def test_cosine_matrix_known_values_and_zero_rows():
    a = torch.stack([E1, E1 + E2, torch.zeros(3)]).reshape(3, 1, 3)  # any trailing shape is flattened
    b = torch.stack([E1, -E2])
    got = cosine_matrix(a, b)
    r = 1 / math.sqrt(2)
    assert torch.allclose(got, torch.tensor([[1.0, 0.0], [r, -r], [0.0, 0.0]]), atol=1e-6)


V = torch.tensor([0.6, -0.8, 0.0])
V_ORTHO = torch.tensor([0.8, 0.6, 0.0])


@pytest.mark.parametrize(
    "memory, l_real, l_gen",
    [
        (torch.stack([V, 2 * V]), 0.0, 1.0),  # identical directions
        (torch.stack([V_ORTHO, E3]), 1.0, 0.0),  # orthogonal
        (torch.stack([-V, -3 * V]), 2.0, -1.0),  # opposite
    ],
)
def test_losses_known_values(memory, l_real, l_gen):
    pred = torch.stack([V, 5 * V]).reshape(2, 3, 1, 1)  # (n, C, H, W); scale does not matter
    memory = memory.reshape(2, 3, 1, 1)
    assert representativeness_loss(pred, memory).item() == pytest.approx(l_real, abs=1e-6)
    assert diversity_loss(pred, memory).item() == pytest.approx(l_gen, abs=1e-6)


def test_losses_take_min_and_max_over_all_pairs():
    pred = torch.stack([E1, E1 + E2])
    memory = torch.stack([E1, E1 + E2 + E3])
    # cosines: [[1, 1/sqrt3], [1/sqrt2, 2/sqrt6]]
    assert representativeness_loss(pred, memory).item() == pytest.approx(1 - 1 / math.sqrt(3), abs=1e-6)
    assert diversity_loss(pred, memory).item() == pytest.approx(1.0, abs=1e-6)


def test_gradients_reach_model_not_memory():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 6)
    x = torch.randn(4, 5)
    memory = torch.randn(3, 2, 3, requires_grad=True)
    pred = linear(x).reshape(4, 2, 3)
    loss = representativeness_loss(pred, memory) + diversity_loss(pred, memory)
    loss.backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    assert memory.grad is None


def _filled_memories():
    mem = ClassMemories(num_classes=4, capacity_real=4, capacity_gen=4, strategy="adaptive")
    mem.real(0).add(torch.stack([E1, E2]))
    mem.gen(0).add(torch.stack([E1]))
    mem.real(1).add(torch.stack([E2]))
    mem.gen(1).add(torch.stack([E3]))
    mem.real(2).add(torch.stack([E1]))  # gen empty: class 2 never contributes
    mem.gen(3).add(torch.stack([E2]))  # real empty: class 3 contributes only its gen term
    return mem


# Batch: class 0 -> [e1], class 1 -> [e2, -e2], class 2 -> [e1].
#   class 0: L_real = 1 - min(1, 0) = 1, L_gen = 1
#   class 1: L_real = 1 - min(1, -1) = 2, L_gen = max(0, 0) = 0
#   class 2: gen memory empty -> nothing, but |C_B| = 3.
LABELS = torch.tensor([1, 0, 2, 1])
PRED = torch.stack([E2, E1, E1, -E2])
LR, LG = 0.5, 2.0


def test_memory_loss_counts_each_class_once():
    mem = _filled_memories()
    total, parts = memory_loss(PRED, LABELS, mem, LR, LG)
    term0, term1 = LR * 1 + LG * 1, LR * 2 + LG * 0
    assert total.item() == pytest.approx((term0 + term1) / 3, abs=1e-6)
    assert parts == pytest.approx({"real": 1.5, "gen": 0.5, "classes": 2})


def test_memory_loss_repeat_defect():
    mem = _filled_memories()
    total, parts = memory_loss(PRED, LABELS, mem, LR, LG, repeat_defect=True)
    term0, term1 = LR * 1 + LG * 1, LR * 2 + LG * 0
    # The running sum is re-added after every visited class (set order 0, 1, 2), class 2 included although
    # its generated memory is empty: class 0 counts three times, class 1 twice.
    assert total.item() == pytest.approx((term0 + 2 * (term0 + term1)) / 3, abs=1e-6)
    correct, _ = memory_loss(PRED, LABELS, mem, LR, LG)
    assert total.item() > correct.item()
    assert parts["classes"] == 2


def test_memory_loss_gen_only_class_and_empty_cases():
    mem = _filled_memories()
    # Class 3: real empty -> only lambda_gen * max cos(e2 pred, e2) = 2 * 1; class 2 adds nothing.
    total, parts = memory_loss(torch.stack([E2, E1]), torch.tensor([3, 2]), mem, LR, LG)
    assert total.item() == pytest.approx(LG * 1.0 / 2, abs=1e-6)
    assert parts == pytest.approx({"real": 0.0, "gen": 1.0, "classes": 1})

    total, parts = memory_loss(torch.stack([E1]), torch.tensor([2]), mem, LR, LG)
    assert total.shape == () and total.item() == 0.0 and parts["classes"] == 0

    # An empty batch (every sample filtered out by --memory-max-t) adds nothing.
    total, parts = memory_loss(torch.empty(0, *E1.shape), torch.empty(0, dtype=torch.long), mem, LR, LG)
    assert total.shape == () and total.item() == 0.0 and parts == {"real": 0.0, "gen": 0.0, "classes": 0}


def test_memory_loss_gradient_flows_to_pred():
    mem = _filled_memories()
    pred = (PRED + 0.1).requires_grad_(True)
    total, _ = memory_loss(pred, LABELS, mem, LR, LG)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert pred.grad[2].abs().sum() == 0  # class 2 (empty gen memory) gets no gradient


COND = [193, 182, 258, 162, 155]  # the model's class index of labels 0..4 (ImageWoof's first five)


def _reference_defect_loop(pred, labels, cond, mem, lambda_real, lambda_gen):
    """The reference code's class loop, re-enacted literally: visit the set of conditioning labels in its own
    iteration order, add a class's terms to a running sum once its generated memory is non-empty, and add the
    running sum to the total after every visited class."""
    y = [cond[c] for c in labels.tolist()]
    total = torch.zeros(())
    running = torch.zeros(())
    for v in set(y):
        c = cond.index(v)
        p = pred[labels == c]
        if len(mem.gen(c)) > 0:
            term = lambda_gen * cosine_matrix(p, mem.gen(c).tensor()).max()
            if len(mem.real(c)) > 0:
                term = term + lambda_real * (1 - cosine_matrix(p, mem.real(c).tensor()).min())
            running = running + term
        total = total + running
    return total / len(set(y))


@pytest.mark.parametrize("strategy", ["adaptive", "fifo"])
def test_repeat_defect_is_the_reference_loop(strategy):
    g = torch.Generator().manual_seed(11)
    mem = ClassMemories(5, 3, 2, strategy)
    mem.gen(3).add(torch.randn(2, 2, 3, 3, generator=g))  # class 3: generated memory only; class 4: never filled
    unsorted = with_empty = 0
    for step in range(20):
        labels = torch.randint(0, 5, (7,), generator=g)
        visit = torch.tensor(COND)[labels]
        order = [COND.index(v) for v in set(visit.tolist())]
        unsorted += order != sorted(order)
        with_empty += any(len(mem.gen(c)) == 0 for c in order[:-1])  # an empty class with visits after it
        pred = torch.randn(7, 2, 3, 3, generator=g, requires_grad=True)
        total, _ = memory_loss(pred, labels, mem, 0.5, 2.0, repeat_defect=True, visit_labels=visit)
        ref_pred = pred.detach().clone().requires_grad_(True)
        ref = _reference_defect_loop(ref_pred, labels, COND, mem, 0.5, 2.0)
        assert total.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7), step
        if ref.requires_grad:
            total.backward()
            ref.backward()
            assert torch.allclose(pred.grad, ref_pred.grad, atol=1e-7), step
        keep = labels < 3  # classes 3 and 4 are never inserted
        mem.update(labels[keep], torch.randn(int(keep.sum()), 2, 3, 3, generator=g), pred.detach()[keep])
    assert unsorted >= 5 and with_empty >= 5  # the batches exercise both faults


def test_repeat_defect_visits_the_set_order_not_the_sorted_order():
    """Known answer: the set of conditioning labels 193, 182, 258 iterates as 193, 258, 182 (not sorted), and
    the class visited at position p of V counts V - p times."""
    assert list({193, 182, 258}) == [193, 258, 182]
    mem = ClassMemories(3, 2, 2, "fifo")
    for c, e in enumerate((E1, E2, E3)):
        mem.gen(c).add(e[None])
    labels = torch.tensor([0, 1, 2])  # cond labels 193, 182, 258
    pred = torch.stack([E1, E2, E3])  # each class's L_gen = 1, no real memory
    total, _ = memory_loss(pred, labels, mem, 0.0, 1.0, repeat_defect=True,
                           visit_labels=torch.tensor([193, 182, 258]))
    # visits: class 0 (193), class 2 (258), class 1 (182): 3 + 2 + 1 = 6 terms of 1, over |C_B| = 3
    assert total.item() == pytest.approx(6 / 3)
    # an empty class visited first still re-adds the (zero) running sum; visited between, it repeats it
    mem2 = ClassMemories(3, 2, 2, "fifo")
    mem2.gen(0).add(E1[None])
    mem2.gen(1).add(E2[None])  # class 2 (258) stays empty and is visited second
    total, _ = memory_loss(pred, labels, mem2, 0.0, 1.0, repeat_defect=True,
                           visit_labels=torch.tensor([193, 182, 258]))
    # visits: 0 -> running 1, total 1; 2 (empty) -> total 2; 1 -> running 2, total 4
    assert total.item() == pytest.approx(4 / 3)


def test_repeat_defect_rejects_visit_labels_that_are_not_one_to_one():
    mem = ClassMemories(3, 2, 2, "fifo")
    with pytest.raises(ValueError, match="exactly one label"):
        memory_loss(torch.stack([E1, E2]), torch.tensor([0, 1]), mem, 0.5, 2.0, repeat_defect=True,
                    visit_labels=torch.tensor([7, 7]))


def test_training_step_visits_the_models_class_indices_with_the_defect():
    """train._add_memory_loss hands the reference loop the conditioning labels (the model's class indices),
    so the visit order is that of the set of ImageNet indices, not of the labels 0..K-1."""
    from memdistill.train import TrainConfig, _add_memory_loss

    g = torch.Generator().manual_seed(4)
    mem = ClassMemories(3, 2, 2, "fifo")
    for c in range(3):
        mem.gen(c).add(torch.randn(2, 2, 3, 3, generator=g))
        mem.real(c).add(torch.randn(2, 2, 3, 3, generator=g))
    labels = torch.tensor([0, 1, 2, 1])
    cond = torch.tensor([193, 182, 258])  # set order 193, 258, 182: labels 0, 2, 1
    pred = torch.randn(4, 2, 3, 3, generator=g)
    cfg = TrainConfig(memory="fifo", repeat_loss_defect=True, lambda_real=0.5, lambda_gen=2.0)
    before = ClassMemories(3, 2, 2, "fifo")
    before.load_state_dict(mem.state_dict())
    loss, _ = _add_memory_loss(torch.zeros(()), pred, labels, torch.randn(4, 2, 3, 3, generator=g),
                               torch.zeros(4, dtype=torch.long), mem, cfg, 0, 1, cond)
    ref = _reference_defect_loop(pred, labels, cond.tolist(), before, 0.5, 2.0)
    by_labels = _reference_defect_loop(pred, labels, [0, 1, 2], before, 0.5, 2.0)
    assert abs(ref.item() - by_labels.item()) > 1e-3  # the two orders give different totals here
    assert float(loss) == pytest.approx(ref.item(), rel=1e-6)
