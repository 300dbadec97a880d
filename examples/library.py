"""fedlora as a library: FSLoRA rounds over any PyTorch model, without configs or files.

A frozen two-layer regressor, four clients with rank budgets 2, 4, 8 and 8 of a rank-8
global adapter, each holding its own slice of a synthetic regression task. Each round is
the three calls every carrier makes: the server configures tasks, clients train them,
the server screens, clips and aggregates the updates. Runs in a second on a CPU:

    python examples/library.py
"""

from types import SimpleNamespace

import torch
from torch import nn

from fedlora.client import local_train
from fedlora.config import TrainConfig
from fedlora.lora import LoRAModel
from fedlora.server import FederatedServer
from fedlora.strategies import build_strategy


class Regressor(nn.Module):
    """Any model whose forward takes a batch's tensors and returns an object with ``.loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, labels):
        y = self.down(torch.tanh(self.up(x)))
        return SimpleNamespace(loss=((y - labels) ** 2).mean())


def main() -> list[float]:
    torch.manual_seed(0)
    lm = LoRAModel(Regressor(), targets=["up", "down"])  # base frozen, LoRA on both layers
    target = Regressor()  # the function the clients' data come from
    data = []
    for _ in range(4):
        x = torch.randn(64, 16)
        data.append({"x": x, "labels": target.down(torch.tanh(target.up(x))).detach()})
    budgets, examples = [2, 4, 8, 8], [64] * 4
    strategy = build_strategy("fslora", lm.shapes(), budgets, seed=0, global_rank=8, alpha=8.0)
    server = FederatedServer(strategy, lm.head_state(), budgets, examples, per_round=3)
    train = TrainConfig(local_steps=5, lr=0.05)
    losses = []
    for rnd in range(1, 11):
        tasks = server.configure(rnd, server.sample(rnd))  # 3 of the 4 clients, seeded
        updates = {cid: local_train(lm, task, [data[cid]] * train.local_steps, train, examples[cid])
                   for cid, task in tasks.items()}
        metrics = server.aggregate(rnd, tasks, updates)  # screening, clipping, head, the strategy
        losses.append(metrics["train_loss"])
        print(f"round {rnd:2d}: clients {sorted(tasks)}, train loss {metrics['train_loss']:.4f}, "
              f"up {metrics['bytes_up'] / 1e3:.1f} kB")
    return losses


if __name__ == "__main__":
    main()
