"""Checkpoint files: a loadable checkpoint.pt at every instant of a rotation, checksums, refusals."""
import os
import pickle

import numpy as np
import pytest
import torch

from metarl import checkpoint
from metarl.checkpoint import CheckpointError


def state(iteration, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"iteration": iteration, "config": {"track": "sine", "seed": seed},
            "track": {"modules": {"m": {"w": torch.randn(64, 8, generator=g), "b": torch.zeros(8)}},
                      "optimizers": {"m": {"state": {0: {"step": torch.tensor(3.0)}},
                                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}}},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.default_rng(seed).bit_generator.state}}


def same(a, b):
    """Independent deep comparison (torch.equal on tensors, == elsewhere)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def without_format(s):
    return {k: v for k, v in s.items() if k not in ("format", "checksum")}


class Killed(BaseException):
    """Stands for a SIGKILL: raised instead of performing a file-system operation."""


@pytest.mark.parametrize("kill_at", range(4))
def test_a_kill_at_any_rename_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, kill_at):
    """After every os.replace / os.link of a rotation, and when the process dies before any of
    them, checkpoint.pt exists and holds the old or the new state."""
    old, new = state(10, seed=1), state(20, seed=2)
    checkpoint.save(tmp_path, state(0, seed=0))
    checkpoint.save(tmp_path, old)
    ops = []

    def watched(real):
        def op(*args):
            if len(ops) == kill_at:
                raise Killed
            real(*args)
            ops.append(args)
            got = without_format(checkpoint.load(tmp_path))  # a kill right after this op: still loadable
            assert same(got, old) or same(got, new)
        return op

    monkeypatch.setattr(checkpoint.os, "replace", watched(os.replace))
    monkeypatch.setattr(checkpoint.os, "link", watched(os.link))
    try:
        checkpoint.save(tmp_path, new)
    except Killed:
        pass
    monkeypatch.undo()
    got = without_format(checkpoint.load(tmp_path))
    assert same(got, old) or same(got, new)
    if same(got, new):  # the rotation completed: the previous one is the old state
        assert same(without_format(checkpoint._read(tmp_path / checkpoint.PREVIOUS, tmp_path)), old)


def test_rotation_keeps_previous_and_leaves_no_temporary(tmp_path):
    for it in (1, 2, 3):
        checkpoint.save(tmp_path, state(it, seed=it))
    assert checkpoint.load(tmp_path)["iteration"] == 3
    assert checkpoint._read(tmp_path / checkpoint.PREVIOUS, tmp_path)["iteration"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {checkpoint.LATEST, checkpoint.PREVIOUS}


def test_stale_temporary_files_are_removed(tmp_path):
    checkpoint.save(tmp_path, state(1))
    (tmp_path / "snapshots").mkdir()
    stale = [tmp_path / ".checkpoint.pt.4242.tmp", tmp_path / ".checkpoint.prev.pt.4242.tmp",
             tmp_path / "snapshots" / ".iteration_5.pt.4242.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert sorted(checkpoint.remove_stale(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and (tmp_path / "notes.tmp").exists()
    assert checkpoint.load(tmp_path)["iteration"] == 1


def test_flipped_bytes_never_load_as_different_values(tmp_path):
    """Flip one byte at many positions (all of the first tensor's storage, and spread over the
    file): every load either raises CheckpointError or returns exactly what was saved."""
    s = state(7)
    path = checkpoint.save(tmp_path, s)
    good = path.read_bytes()
    w = s["track"]["modules"]["m"]["w"].numpy().tobytes()
    at = good.find(w)
    assert at > 0, "the weight's bytes are stored verbatim"
    positions = list(range(at, at + len(w), 7)) + list(range(0, len(good), max(1, len(good) // 300)))
    refused = 0
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 0x10
        path.write_bytes(bytes(bad))
        try:
            got = checkpoint.load(tmp_path)
        except CheckpointError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        assert same(without_format(got), s), f"flipped byte {pos} loaded silently as different values"
    assert refused >= len(range(at, at + len(w), 7))


def test_checksum_mismatch_message_points_at_previous(tmp_path):
    checkpoint.save(tmp_path, state(1))
    path = checkpoint.save(tmp_path, state(2))
    data = bytearray(path.read_bytes())
    at = data.find(state(2)["track"]["modules"]["m"]["w"].numpy().tobytes())
    data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum.*previous good checkpoint"):
        checkpoint.load(tmp_path)


def test_format_1_checkpoints_without_checksum_still_load(tmp_path):
    s = state(5)
    torch.save({"format": 1, **s}, tmp_path / checkpoint.LATEST)
    assert same(without_format(checkpoint.load(tmp_path)), s)


def test_a_pickle_carrying_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / checkpoint.LATEST, "wb") as f:
        pickle.dump({"format": 2, "iteration": 1, "x": Payload()}, f, protocol=2)
    torch.save({"format": 2, "iteration": 1, "x": Payload()}, tmp_path / "snap.pt")
    for p in (tmp_path / checkpoint.LATEST, tmp_path / "snap.pt"):
        with pytest.raises(CheckpointError, match="refusing .*would run code"):
            checkpoint._read(p, tmp_path)
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    path = checkpoint.save(tmp_path, state(3))
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt"):
            checkpoint.load(tmp_path)


def test_checkpoint_without_its_config_is_refused(tmp_path):
    s = state(3)
    del s["config"]
    checkpoint.save(tmp_path, s)
    with pytest.raises(CheckpointError, match="lacks config"):
        checkpoint.load(tmp_path)


def test_a_run_left_without_checkpoint_pt_resumes_from_previous(tmp_path):
    """What the old rotation could leave behind after a SIGKILL: only checkpoint.prev.pt."""
    checkpoint.save(tmp_path, state(4))
    os.replace(tmp_path / checkpoint.LATEST, tmp_path / checkpoint.PREVIOUS)
    assert checkpoint.load(tmp_path)["iteration"] == 4


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line():
    """Saved tensors that do not fit the model the code builds (a key missing, one too many, or
    another shape: a checkpoint of an older version) raise CheckpointError naming the keys, before
    any tensor is copied; a fitting one loads."""
    from metarl.tracks.base import Track
    torch.manual_seed(0)
    track = Track(cfg=None)
    track.modules = {"net": torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))}
    before = {k: v.clone() for k, v in track.modules["net"].state_dict().items()}
    good = {k: v + 1 for k, v in before.items()}
    missing = {k: v for k, v in good.items() if not k.startswith("1.")}
    extra = {**good, "2.weight": torch.ones(3)}
    resized = {**good, "0.bias": torch.zeros(4)}
    for saved, said in ((missing, "missing 1.bias, 1.num_batches_tracked, 1.running_mean ..."),
                        (extra, "unexpected 2.weight"), (resized, "other shape 0.bias")):
        with pytest.raises(CheckpointError, match=f"'net' does not fit .*\\({said}\\)"):
            track.load_state_dict({"modules": {"net": saved}, "optimizers": {}})
        assert all(torch.equal(v, before[k]) for k, v in track.modules["net"].state_dict().items())
    track.load_state_dict({"modules": {"net": good}, "optimizers": {}})
    assert all(torch.equal(v, good[k]) for k, v in track.modules["net"].state_dict().items())
