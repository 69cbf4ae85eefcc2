"""Made tests/data/state_v1.pt: AdaBelief states in storage format version 1, run with
PYTHONPATH pointing at the sources of commit 3d3a8c4 (format version 1); kept for the record.

    PYTHONPATH=<v1 checkout>/src python tests/data/make_state_v1.py tests/data/state_v1.pt
"""

import sys

import torch

import adabelief

out = {}
for precision in ("bf16", "int8"):
    for amsgrad in (False, True):
        torch.manual_seed(0)
        # 64x72 = 4608 elements: >= MIN_QUANTIZED_NUMEL (int8 blocks, the last one partial);
        # 40 elements: a bias, kept in float32 under int8.
        params = [
            torch.nn.Parameter(torch.randn(64, 72) * 0.1),
            torch.nn.Parameter(torch.randn(40)),
        ]
        opt = adabelief.AdaBelief(params, lr=1e-2, state_precision=precision, amsgrad=amsgrad)
        for step in range(5):
            for p in params:
                p.grad = torch.randn_like(p) * (0.5 + step)
            opt.step()
        name = f"{precision}{'_amsgrad' if amsgrad else ''}"
        out[name] = {"params": [p.detach().clone() for p in params], "optimizer": opt.state_dict()}
torch.save(out, sys.argv[1])
