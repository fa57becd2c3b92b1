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
    # running sums after class 0 and class 1 are re-added: class 0 counts twice.
    assert total.item() == pytest.approx((term0 + (term0 + term1)) / 3, abs=1e-6)
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
