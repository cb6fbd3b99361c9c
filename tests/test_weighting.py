"""Loss weighting methods, each tested on what defines it."""

import math

import pytest
import torch

from pipeline.weighting import WEIGHTINGS, StepContext, min_norm_weights
from schemas.params import StudentParams

CONFIG = StudentParams()


def make(name: str, tasks=("a", "b")):
    return WEIGHTINGS[name](list(tasks), CONFIG)


def leaf_losses(*values: float) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor(v, requires_grad=True) for name, v in zip("abc", values, strict=False)
    }


def unused_context() -> StepContext:
    return StepContext(torch.zeros(1), [])


def test_registry_lists_every_method():
    assert WEIGHTINGS.names() == ["ew", "dwa", "uw", "gradnorm", "mgda"]


def test_dwa_weights_follow_the_last_two_epochs_losses():
    dwa = make("dwa")
    assert dwa.weights() == {"a": 1.0, "b": 1.0}
    dwa.end_epoch({"a": 1.0, "b": 1.0})
    assert dwa.weights() == {"a": 1.0, "b": 1.0}  # two epochs are needed
    dwa.end_epoch({"a": 0.5, "b": 1.0})  # a improved, b did not
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)
    expected = {"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)}
    assert dwa.weights() == pytest.approx(expected)
    losses = leaf_losses(3.0, 4.0)
    returned = dwa.backward(losses, None, unused_context())
    assert returned == pytest.approx(expected)
    assert losses["a"].grad.item() == pytest.approx(expected["a"])
    assert losses["b"].grad.item() == pytest.approx(expected["b"])


def test_uw_loss_is_loss_over_twice_exp_plus_half_log_variance():
    uw = make("uw")
    assert uw.log_variance.tolist() == [-0.5, -0.5]
    with torch.no_grad():
        uw.log_variance.copy_(torch.tensor([0.0, math.log(4.0)]))
    losses = leaf_losses(2.0, 8.0)
    weights = uw.backward(losses, None, unused_context())
    assert weights == pytest.approx({"a": 0.5, "b": 0.125})
    assert losses["a"].grad.item() == pytest.approx(0.5)  # 1 / (2 e^s)
    assert losses["b"].grad.item() == pytest.approx(0.125)
    # d/ds [L / (2 e^s) + s / 2] = -L / (2 e^s) + 1/2
    assert uw.log_variance.grad.tolist() == pytest.approx([-2 / 2 + 0.5, -8 / 8 + 0.5])


def test_the_extra_term_is_added_unweighted():
    extra = torch.tensor(5.0, requires_grad=True)
    make("uw").backward(leaf_losses(1.0, 1.0), extra, unused_context())
    assert extra.grad.item() == 1.0


def gradnorm_step(method, weights_param: torch.Tensor, offsets: tuple[float, float]):
    """Two tasks with equal gradients at the shared layer and different loss values."""
    losses = {
        name: weights_param.sum() + offset for name, offset in zip("ab", offsets, strict=True)
    }
    return method.backward(losses, None, StepContext(torch.zeros(1), [weights_param]))


def test_gradnorm_moves_weight_towards_the_slower_task():
    gradnorm = make("gradnorm")
    shared = torch.nn.Parameter(torch.tensor([0.5, 0.5]))
    assert gradnorm_step(gradnorm, shared, (0.0, 0.0)) == pytest.approx({"a": 1.0, "b": 1.0})
    shared.grad = None
    # Task a's loss fell to 0.2 of its first value, task b's only to 0.9: b trains slower.
    gradnorm_step(gradnorm, shared, (-0.8, -0.1))
    grad = gradnorm.theta.grad
    assert grad[1] < 0 < grad[0]
    torch.optim.SGD([gradnorm.theta], lr=0.1).step()
    weights = gradnorm.current_weights()
    assert weights[1] > 1 > weights[0]
    assert weights.sum().item() == pytest.approx(2.0)
    # The network gets the gradient of the weighted sum with the weights before the update.
    torch.testing.assert_close(shared.grad, torch.tensor([2.0, 2.0]))


@pytest.mark.parametrize(
    ("vectors", "expected"),
    [
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),
        ([[1.0, 0.0], [2.0, 0.0]], [1.0, 0.0]),  # the shorter of two aligned gradients
        ([[1.0, 0.0], [-1.0, 0.0]], [0.5, 0.5]),  # opposed: the origin
        ([[3.0, 1.0], [1.0, 3.0]], [0.5, 0.5]),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [1 / 3, 1 / 3, 1 / 3]),
        ([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], [0.5, 0.5, 0.0]),  # the third lies beyond
    ],
)
def test_min_norm_solver_on_known_cases(vectors, expected):
    g = torch.tensor(vectors, dtype=torch.float64)
    alpha = min_norm_weights(g @ g.T)
    assert alpha.tolist() == pytest.approx(expected, abs=1e-4)
    assert alpha.sum().item() == pytest.approx(1.0)


def test_mgda_weighs_by_the_min_norm_point_of_gradients_at_the_representation():
    mgda = make("mgda")
    representation = torch.tensor([1.0, 1.0], requires_grad=True)
    losses = {"a": (representation * torch.tensor([1.0, 0.0])).sum(),
              "b": (representation * torch.tensor([0.0, 3.0])).sum()}  # fmt: skip
    weights = mgda.backward(losses, None, StepContext(representation, []))
    # min |alpha e1 + (1 - alpha) 3 e2|: alpha = 9 / 10.
    assert weights == pytest.approx({"a": 0.9, "b": 0.1}, abs=1e-4)
    torch.testing.assert_close(representation.grad, torch.tensor([0.9, 0.3]))


def assert_min_norm_certificate(g: torch.Tensor, alpha: torch.Tensor) -> None:
    """Optimality on the simplex: with v = sum alpha_k g_k, every g_k . v >= |v|^2, with equality
    where alpha_k > 0 (the KKT conditions of min |v|^2)."""
    v = alpha @ g
    scores, norm = g @ v, v @ v
    scale = (g @ g.T).abs().max()
    assert (scores >= norm - 1e-9 * scale).all()
    support = alpha > 1e-9
    torch.testing.assert_close(
        scores[support], norm.expand(int(support.sum())), atol=1e-9 * scale, rtol=0
    )


def test_min_norm_solver_is_exact_on_ill_conditioned_pairs():
    """Two tasks have a closed form: alpha_1 = clamp((g2 - g1) . g2 / |g1 - g2|^2, 0, 1)."""
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        g1 = torch.randn(64, generator=rng, dtype=torch.float64)
        g2 = 3.0 * g1 + 1e-3 * torch.randn(64, generator=rng, dtype=torch.float64)
        alpha = min_norm_weights(torch.stack([g1, g2]) @ torch.stack([g1, g2]).T)
        exact = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
        assert alpha[0].item() == pytest.approx(exact.item(), abs=1e-9)


def test_min_norm_solver_is_exact_on_ill_conditioned_triples():
    """Gradients whose Gram matrix spans 8 orders of magnitude, where Frank-Wolfe stops short."""
    rng = torch.Generator().manual_seed(1)
    for _ in range(50):
        base = torch.randn(3, 16, generator=rng, dtype=torch.float64)
        g = base * torch.tensor([[1.0], [1e2], [1e4]], dtype=torch.float64)
        g[2] = g[1] + 1e-2 * torch.randn(16, generator=rng, dtype=torch.float64)
        alpha = min_norm_weights(g @ g.T)
        assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= 0).all()
        assert_min_norm_certificate(g, alpha)
