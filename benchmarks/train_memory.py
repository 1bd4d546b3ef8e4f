"""Training memory of a recipe's backbone, measured on the CPU (this machine has no GPU): peak resident memory of
one forward + backward pass in fp32 at the recipe's input size, with and without gradient checkpointing.

Each setting runs in a fresh subprocess; the figure is the growth of the process's peak RSS over the model and
optimizer state (weights + AdamW moments + gradients), divided by the batch: the activation memory per photo.
On a GPU with bf16 autocast activations take roughly half of the fp32 figure; the weights, gradients and AdamW
state (4 x parameters x 4 bytes) come on top. This is a proxy, not a GPU measurement.

    python benchmarks/train_memory.py convnext_large_mlp.clip_laion2b_augreg_ft_in1k_384 512 --batch 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(model_name: str, size: int, batch: int, ckpt: bool) -> dict:
    import timm
    import torch

    torch.set_num_threads(2)
    model = timm.create_model(model_name, pretrained=False, num_classes=396)
    if ckpt:
        model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 396, (batch,))
    # one step to allocate gradients and AdamW state, then measure a second step's peak
    torch.nn.functional.cross_entropy(model(x[:1]), y[:1]).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.nn.functional.cross_entropy(model(x), y).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    return {"model": model_name, "size": size, "batch": batch, "grad_checkpointing": ckpt,
            "params_m": params / 1e6, "state_mib": params * 16 / 2**20, "base_rss_mib": base,
            "activation_mib_per_photo": (peak - base) / batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("size", type=int)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--child", choices=["on", "off"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.model, a.size, a.batch, a.child == "on")))
        return
    for ckpt in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, a.model, str(a.size), "--batch", str(a.batch), "--child", ckpt],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
