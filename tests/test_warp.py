"""Task-shift evaluation (Finn & Levine 2018 sec. 7): the affine warps against their formula, the
shift curve against the plain curve, and `metarl evaluate --shift` / `metarl compare --shift`."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from metarl import config, evaluation
from metarl.objectives import accuracy
from metarl.tasks.batch import TaskBatch
from metarl.tasks.warp import warp_batch, warp_images
from metarl.training import train


def test_zero_shear_and_unit_scale_are_the_identity():
    x = torch.rand(2, 3, 1, 28, 28)
    assert torch.equal(warp_images(x, "shear", 0.0), x)
    assert torch.equal(warp_images(x, "scale", 1.0), x)
    assert warp_images(x, "shear", 0.3).shape == x.shape and not torch.allclose(warp_images(x, "shear", 0.3), x)


def one_pixel(r, c, size=8):
    x = torch.zeros(1, 1, size, size, dtype=torch.float64)
    x[0, 0, r, c] = 1.0
    return x


def centre(i, size=8):
    return (2 * i + 1) / size - 1  # normalised coordinate of pixel i's centre (align_corners=False)


@pytest.mark.parametrize("r,c", [(7, 2), (0, 5)])
def test_a_sheared_pixel_lands_where_the_formula_says(r, c):
    """Shear s moves (x, y) to (x + s·y, y); s = 4/7 moves a pixel of the bottom (top) row of an
    8×8 image by +2 (−2) columns, exactly onto a pixel centre, so bilinear sampling keeps it whole."""
    s = 4 / 7
    x_new = centre(c) + s * centre(r)
    c_new = round(((x_new + 1) * 8 - 1) / 2)
    assert abs(centre(c_new) - x_new) < 1e-12 and c_new == c + (2 if r == 7 else -2)
    out = warp_images(one_pixel(r, c), "shear", s)[0, 0]
    want = one_pixel(r, c_new)[0, 0]
    assert torch.allclose(out, want, atol=1e-6), out


def test_a_scaled_pixel_lands_where_the_formula_says():
    """Scale 3 moves (x, y) to (3x, 3y): pixel (4, 4) of an 8×8 image (centre 0.125) goes to 0.375,
    the centre of pixel (5, 5), with the peak intact."""
    out = warp_images(one_pixel(4, 4), "scale", 3.0)[0, 0]
    assert out[5, 5] == pytest.approx(1.0, abs=1e-6) and out.argmax().item() == 5 * 8 + 5


def nearest_neighbour(batch):
    """A black box without parameters: each query takes the label of the nearest support image."""
    d = torch.cdist(batch.x_query.flatten(2), batch.x_support.flatten(2))
    pred = batch.y_support.gather(1, d.argmin(-1))
    return [torch.nn.functional.one_hot(pred, 5).float()]


def test_shift_curve_at_zero_is_the_plain_curve_and_warps_both_sets():
    g = torch.Generator().manual_seed(0)
    batches = [TaskBatch(torch.rand(4, 5, 1, 12, 12, generator=g), torch.arange(5).repeat(4, 1),
                         torch.rand(4, 5, 1, 12, 12, generator=g), torch.arange(5).repeat(4, 1)) for _ in range(2)]
    for b in batches:  # queries are noisy copies of their support image
        b.x_query.copy_(b.x_support + 0.05 * torch.rand(b.x_support.shape, generator=g))
    plain = evaluation.curve(nearest_neighbour, batches, accuracy)
    vals, stage = evaluation.shift_curve(nearest_neighbour, lambda: iter(batches), accuracy, "shear", [0.0, 0.5])
    assert vals.shape == (8, 2) and stage == 0 and np.array_equal(vals[:, 0], plain[:, 0])
    assert vals[:, 1].mean() > 0.9  # support and query are warped alike, so matching still works
    warped = warp_batch(batches[0], "shear", 0.5)
    assert torch.equal(warped.x_support, warp_images(batches[0].x_support, "shear", 0.5)) and torch.equal(warped.y_query, batches[0].y_query)
    summary = evaluation.shift_summary({"nn": vals}, "shear", [0.0, 0.5], stage, "support examples per class seen")
    assert summary["nn"]["kind"] == "shear" and summary["nn"]["values"] == [0.0, 0.5] and len(summary["nn"]["ci95"]) == 2


def test_parse_shift_errors_are_one_line():
    assert evaluation.parse_shift("scale=1,0.8") == ("scale", [1.0, 0.8])
    for bad in ("shear", "rotate=1,2", "shear=a,b"):
        with pytest.raises(ValueError, match="KIND=V1,V2"):
            evaluation.parse_shift(bad)


@pytest.mark.slow  # CI budget (15 min on 2 cores): run by `make test-slow` / .ci/slow
def test_evaluate_and_compare_with_shift(tmp_path):
    """`metarl evaluate RUN --shift shear=...` writes the shift entry and shift.png for a gradient
    method and a black box; `metarl compare A B --shift` overlays them."""
    env = {**__import__("os").environ, "METARL_CACHE": str(tmp_path / "cache")}
    runs = {}
    for alg, extra in (("maml", ["model.hidden=8", "inner.task_workers=1"]),
                       ("snail", ["snail.hidden=8", "snail.embedding=8", "snail.key_sizes=[8]", "snail.value_sizes=[8]"])):
        cfg = config.load("experiments/omniglot_5w1s.yaml", [f"algorithm={alg}", "iterations=1", "meta_batch=2", "baselines=[]",
                                                              "checkpoint_every=1", *extra])
        train(cfg, tmp_path / alg, tensorboard=False)
        p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(tmp_path / alg), "--tasks", "4", "--steps", "1",
                            "--shift", "shear=0,0.5"], capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, p.stderr
        out = json.loads((tmp_path / alg / "eval" / "adaptation.json").read_text())
        entry = out["shift"][alg]
        assert entry["kind"] == "shear" and entry["values"] == [0.0, 0.5] and entry["step"] == 1 and entry["n_tasks"] == 4
        assert entry["mean"][0] == pytest.approx(out["methods"][alg]["mean"][1])  # no warp: the curve's last point
        assert (tmp_path / alg / "eval" / "shift.png").exists()
        runs[alg] = tmp_path / alg
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "compare", str(runs["maml"]), str(runs["snail"]), "--shift",
                        "--out", str(tmp_path / "shift.png")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "shift.png").exists() and "maml" in p.stdout and "snail" in p.stdout
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(runs["maml"]), "--tasks", "4", "--shift", "rotate=1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "shear=0,0.2" in p.stderr
