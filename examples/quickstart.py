"""Quick start: the seed document's example, done right.

The document this project started from adds ``g * temperature`` to the logits and feeds the
resulting probabilities into ``cross_entropy``. The correct sample is
``softmax((logits + g) / tau)``, and a classification loss takes log-probabilities.
Run: ``python examples/quickstart.py``.
"""

import torch
import torch.nn.functional as F

import gumbelkit as gk


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.1, 0.2, 0.7]))

    print("Gumbel-Max is an exact categorical sampler:")
    idx = gk.gumbel_max(logits.expand(100_000, 3), generator=gen)
    print("  frequencies", [round(c / 100_000, 3) for c in torch.bincount(idx, minlength=3).tolist()],
          "vs softmax", [round(p, 3) for p in logits.softmax(-1).tolist()])

    print("Temperature: high = smooth, low = nearly one-hot:")
    for tau in (5.0, 1.0, 0.1):
        y = gk.gumbel_softmax(logits, tau, generator=torch.Generator().manual_seed(1))
        print(f"  tau={tau:<4} y={[round(v, 3) for v in y.tolist()]}")

    print("Training a classifier through a Gumbel-Softmax layer (loss on log-probabilities):")
    torch.manual_seed(0)  # the network's initial weights
    x = torch.randn(512, 10, generator=gen)
    target = (x[:, :3].argmax(-1))  # a learnable 3-class rule
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(301):
        log_y = gk.log_gumbel_softmax(net(x), tau=0.5, generator=gen)
        loss = F.nll_loss(log_y, target)  # log-probabilities in, not probabilities
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  step {step:3d} loss {loss.item():.3f}")
    with torch.no_grad():
        hard = gk.gumbel_softmax(net(x), tau=0.5, hard=True, generator=gen)
        acc = (hard.argmax(-1) == target).float().mean().item()
    print(f"  accuracy of hard samples: {acc:.3f}")


if __name__ == "__main__":
    main()
