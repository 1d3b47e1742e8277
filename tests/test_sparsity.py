"""2:4 structured sparsity on the trained small model: magnitude and Wanda one-shot pruning keep the pattern in
every group of 4, density exactly 0.5, cost > 2% perplexity; apply_masks keeps the pattern through fine-tuning."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.test_quant import N_CALIB, N_EVAL, SEQ, SPLIT_SEED, train_loop, trained_checkpoint


@pytest.fixture(scope="module")
def setup(data_root, tmp_path_factory):
    from megaseek.ckpt.hf import load_model
    from megaseek.quant.calib import mean_loss, run_windows
    ckpt = trained_checkpoint(data_root, tmp_path_factory.getbasetemp() / "quant_model")
    model, _ = load_model(ckpt)
    w = run_windows(ckpt, SEQ, "train", N_EVAL + N_CALIB, seed=SPLIT_SEED)
    evalw, calib = w[:N_EVAL], w[N_EVAL:]
    return model, calib, evalw, mean_loss(model, evalw)


def test_mask_2of4_unit():
    from megaseek.quant.sparsity import check_2of4, mask_2of4
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0, -9.0, 0.5, 0.1, 8.0]]).abs()
    assert mask_2of4(s).tolist() == [[False, True, False, True, True, False, False, True]]
    assert check_2of4(torch.ones(2, 8)) == 4 and check_2of4(s * mask_2of4(s)) == 0
    with pytest.raises(ValueError, match="multiple of 4"):
        mask_2of4(torch.ones(2, 6))


def test_one_shot_2of4(setup):
    from megaseek.quant.calib import hessians, mean_loss
    from megaseek.quant.modules import target_linears
    from megaseek.quant.sparsity import check_2of4, density_report, prune_2of4
    model, calib, evalw, base = setup
    costs = {}
    for method in ("magnitude", "wanda"):
        m = copy.deepcopy(model)
        H = hessians(m, target_linears(m), calib) if method == "wanda" else None
        masks = prune_2of4(m, method, H)
        rep = density_report(m)
        assert rep["total"] == 0.5 and all(v == 0.5 for v in rep.values()), rep
        for name, mod in target_linears(m).items():
            assert check_2of4(mod.weight.detach()) == 0, name
            assert torch.equal(mod.weight.detach() != 0, masks[name] & (model.get_submodule(name).weight != 0))
        costs[method] = math.exp(mean_loss(m, evalw) - base) - 1
    print(f"[2:4] one-shot ppl cost: magnitude {100 * costs['magnitude']:.2f}%, wanda {100 * costs['wanda']:.2f}%")
    assert costs["magnitude"] > 0.02 and costs["wanda"] > 0.02


def test_masks_survive_finetuning(setup):
    from megaseek.quant.modules import target_linears
    from megaseek.quant.sparsity import apply_masks, check_2of4, density_report, prune_2of4
    model, calib, _, _ = setup
    m = copy.deepcopy(model)
    masks = prune_2of4(m, "magnitude")
    before = {n: mod.weight.detach().clone() for n, mod in target_linears(m).items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_loop(m, calib, steps=100, lr=1e-3, batch=4, after_step=lambda mm: apply_masks(mm, masks))
    finally:
        torch.set_num_threads(threads)
    assert density_report(m)["total"] == 0.5
    for name, mod in target_linears(m).items():
        assert check_2of4(mod.weight.detach()) == 0, name
    assert any(not torch.equal(before[n], mod.weight.detach()) for n, mod in target_linears(m).items())
