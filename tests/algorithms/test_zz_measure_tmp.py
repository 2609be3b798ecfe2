import torch
from fedhb.algorithms import FLoRA
from fedhb.models.lora import lora_pairs, layer_of


def _stats(loop, a0):
    out = []
    for a, b in lora_pairs(loop.model_names):
        u = loop.algorithm.merged_update(layer_of(a))
        q, _ = torch.linalg.qr(a0[a].double().T)  # in x r basis of rowspace(A0)
        inside = (u @ q).pow(2).sum() / u.pow(2).sum()
        out.append((int(torch.linalg.matrix_rank(u)), round(float(inside), 3)))
    return out


def test_measure(make_loop):
    for redraw in (False, True):
        algo = FLoRA()
        loop = make_loop(algo, clients=4)
        a0 = {k: v.clone() for k, v in loop.client_module.get_state().items()}
        if not redraw:
            algo._restart = lambda: setattr(algo, "_resets", {algo._rank: algo._initial}) or setattr(algo, "_fresh", algo._initial)
        for r in range(1, 7):
            loop.run_round(r)
            print(redraw, r, _stats(loop, a0))
