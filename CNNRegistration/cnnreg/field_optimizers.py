"""Update rules of a dense displacement field (instance mode and learned-refine): a global-step
Adam, PyTorch's Adam and a greedy fluid step; the phantom CNN's weights use PyTorch's Adam.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .settings import DENSE_LEARNING_RATES, Optimizer
from .spatial import gaussian_smooth


class FieldOptimizer:
    """Base of the dense-field optimisers: one parameter group (``lr`` and the optimiser's
    hyper-parameters), per-tensor ``state`` and :meth:`zero_grad`, as in ``torch.optim`` -- but
    not a ``torch.optim.Optimizer``: building one of those imports ``torch._dynamo`` on the
    first use in a process (1.4-2 s; a learned-refine registration of a 96^3 pair takes ~2 s
    without it), and the Slicer module runs each registration in a new process.  Subclasses
    implement ``step()``."""

    def __init__(self, params, defaults: dict):
        self.param_groups = [{**defaults, "params": list(params)}]
        self.state: defaultdict[torch.Tensor, dict] = defaultdict(dict)

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def set_learning_rate_factor(optimizer, factor: float) -> None:
    """``lr = initial_lr * factor`` in every parameter group (``torch.optim`` optimisers and
    :class:`FieldOptimizer`; what ``LambdaLR`` does, without its scheduler machinery)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


class GlobalAdam(FieldOptimizer):
    """Adam with one second-moment estimate per parameter tensor instead of per element.

    Per-element Adam gives every voxel of a dense field a step of about ``lr``, however weak
    its evidence, which turns textureless regions into noise; normalising by the tensor's
    gradient RMS keeps steps proportional to the local gradient (as demons-type methods do),
    so ``lr`` is the step, in voxels, of a voxel with an RMS-sized gradient.
    """

    def __init__(
        self,
        params,
        lr: float = DENSE_LEARNING_RATES[Optimizer.GLOBAL_ADAM],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum"] = torch.zeros_like(p)
                    state["square"] = p.new_zeros(())
                state["step"] += 1
                state["momentum"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["square"].mul_(beta2).add_(p.grad.pow(2).mean(), alpha=1 - beta2)
                momentum = state["momentum"] / (1 - beta1 ** state["step"])
                square = state["square"] / (1 - beta2 ** state["step"])
                p.sub_(group["lr"] * momentum / (square.sqrt() + group["eps"]))


class GreedyFluid(FieldOptimizer):
    """Demons/SyN-style greedy steps: the gradient is Gaussian-smoothed (``sigma`` voxels, a
    fluid-like regularisation of each update) and scaled so that the largest step of any
    voxel is ``lr`` voxels.  Use with a small or zero penalty on the total field."""

    def __init__(self, params, lr: float = DENSE_LEARNING_RATES[Optimizer.GREEDY], sigma: float = 3.0):
        super().__init__(params, dict(lr=lr, sigma=sigma))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = gaussian_smooth(p.grad, group["sigma"]) if group["sigma"] > 0 else p.grad
                largest = direction.norm(dim=1).max().clamp_min(1e-12)
                p.sub_(group["lr"] * direction / largest)


#: optimisers of a dense field (the phantom CNN's weights always use Adam)
OPTIMIZERS = {Optimizer.GLOBAL_ADAM: GlobalAdam, Optimizer.ADAM: torch.optim.Adam, Optimizer.GREEDY: GreedyFluid}
