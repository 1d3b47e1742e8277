"""2:4 structured sparsity on the trained small model: magnitude and Wanda one-shot pruning keep the pattern in
every group of 4, density exactly 0.5, cost > 2% perplexity; apply_masks keeps the pattern through 100 fine-tuning
steps and the sparse model ends within 1% of a dense fine-tuned control's perplexity."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.test_quant import N_CALIB, N_EVAL, SEQ, SPLIT_SEED, train_loop, trained_checkpoint

FT_STEPS = 100


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


@pytest.mark.slow
def test_masks_survive_finetuning(setup, data_root, tmp_path_factory):
    """Magnitude 2:4 then 100 fine-tuning steps with apply_masks after every optimizer step: the pattern and
    density 0.5 hold, the kept weights moved, and the held-out perplexity ends within 1% of a dense control
    fine-tuned the same steps on the same batches."""
    from megaseek.quant.calib import mean_loss, run_windows
    from megaseek.quant.modules import target_linears
    from megaseek.quant.sparsity import apply_masks, check_2of4, density_report, prune_2of4
    model, calib, evalw, _ = setup
    ckpt = trained_checkpoint(data_root, tmp_path_factory.getbasetemp() / "quant_model")
    data = run_windows(ckpt, SEQ, "train", None, seed=SPLIT_SEED)[N_EVAL + N_CALIB:]
    m, dense = copy.deepcopy(model), copy.deepcopy(model)
    masks = prune_2of4(m, "magnitude")
    one_shot = math.exp(mean_loss(m, evalw))
    before = {n: mod.weight.detach().clone() for n, mod in target_linears(m).items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(steps=FT_STEPS, lr=2e-3, batch=8, seed=5, warmup=5)
        train_loop(m, data, after_step=lambda mm: apply_masks(mm, masks), **kw)
        train_loop(dense, data, **kw)
    finally:
        torch.set_num_threads(threads)
    assert density_report(m)["total"] == 0.5
    for name, mod in target_linears(m).items():
        assert check_2of4(mod.weight.detach()) == 0, name
        assert torch.equal(mod.weight.detach() != 0, masks[name] & (mod.weight.detach() != 0)), name
    assert any(not torch.equal(before[n], mod.weight.detach()) for n, mod in target_linears(m).items())
    ps, pd = math.exp(mean_loss(m, evalw)), math.exp(mean_loss(dense, evalw))
    print(f"[2:4] after {FT_STEPS} fine-tuning steps: sparse ppl {ps:.3f} (one-shot {one_shot:.3f}), dense control "
          f"{pd:.3f}: {100 * (ps / pd - 1):.2f}% apart")
    assert ps <= pd * 1.01
