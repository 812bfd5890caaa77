"""Faults at the file layer: failing writes (no space, permission denied), killed writes, bit flips
and truncation of torch checkpoints that carry our checksum."""
from __future__ import annotations

import builtins
import errno
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mae_backbone import io as mio
from mae_backbone.checkpoint import read_checkpoint, save_checkpoint
from mae_backbone.io import (
    CHECKSUM_KEY,
    CheckpointError,
    CheckpointWriteError,
    add_checksum,
    atomic_torch_save,
    atomic_write_bytes,
    remove_stale_temporaries,
    safe_torch_load,
)

import fault_harness as fh  # tests/helpers: FailingFile, a disk that fills up



def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 16, generator=g), "b": torch.zeros(16, dtype=torch.bfloat16)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]},
            "epoch": 3, "config": {"data": "/x", "lr": None, "flag": True}}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def fail_writes(monkeypatch, limit: int, code: int) -> None:
    """Writes through ``mae_backbone.io`` fail with ``code`` after ``limit`` bytes (the OS layer)."""

    def fake_open(path, mode="r", *a, **kw):
        f = builtins.open(path, mode, *a, **kw)
        return fh.FailingFile(f, limit, code) if "w" in mode else f

    monkeypatch.setattr(mio, "open", fake_open, raising=False)


@pytest.mark.parametrize("code, limit", [(errno.ENOSPC, 0), (errno.ENOSPC, 1500), (errno.EDQUOT, 700)])
def test_a_write_that_runs_out_of_space_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code, limit):
    path = tmp_path / "checkpoint.pth"
    atomic_torch_save(add_checksum(_state(0)), path)
    before = path.read_bytes()
    fail_writes(monkeypatch, limit, code)
    with pytest.raises(CheckpointWriteError, match=rf"{path}: could not write it \({os.strerror(code)}\); "
                                                   "the previous file is unchanged"):
        atomic_torch_save(add_checksum(_state(1)), path)
    with pytest.raises(CheckpointWriteError, match=os.strerror(code)):
        atomic_write_bytes(b"x" * 5000, tmp_path / "other.bin")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _equal(safe_torch_load(path), add_checksum(_state(0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temporary left behind


@pytest.mark.parametrize("where", ["create", "replace"])
def test_permission_denied_keeps_the_previous_file_and_names_it(tmp_path, monkeypatch, where):
    path = tmp_path / "encoder.safetensors"
    save_checkpoint({"w": torch.ones(4, 4)}, path)
    before = path.read_bytes()

    def deny(*a, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(mio.tempfile if where == "create" else mio.os, "mkstemp" if where == "create" else "replace",
                        deny)
    with pytest.raises(CheckpointWriteError, match=rf"{path}: could not write it \(Permission denied\)"):
        save_checkpoint({"w": torch.zeros(4, 4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(read_checkpoint(path)[0]["w"], torch.ones(4, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.safetensors"]


def test_a_first_write_that_fails_says_no_file_was_written(tmp_path, monkeypatch):
    fail_writes(monkeypatch, 10, errno.ENOSPC)
    with pytest.raises(CheckpointWriteError, match="no file was written"):
        atomic_torch_save({"a": torch.ones(100)}, tmp_path / "new.pth")
    assert not list(tmp_path.iterdir())


def test_an_interrupt_during_the_write_is_not_turned_into_a_write_error(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    atomic_torch_save({"a": 1}, path)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(mio.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"a": 2}, path)
    monkeypatch.undo()
    assert safe_torch_load(path) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(b"abc", tmp_path / "f.bin")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600


def test_stale_temporaries_of_killed_writes_are_found_and_removed(tmp_path):
    path = tmp_path / "checkpoint.pth"
    stale = [tmp_path / ".checkpoint.pth.abc123.tmp", tmp_path / ".checkpoint.pth.zz.tmp"]
    for p in stale:
        p.write_bytes(b"PK\x03\x04 half")
    keep = [tmp_path / ".other.pth.x.tmp", tmp_path / "checkpoint.pth.bak"]
    for p in keep:
        p.write_bytes(b"keep")
    assert remove_stale_temporaries(path) == stale
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_bit_flips_anywhere_are_refused_or_change_nothing(tmp_path):
    """torch's zip container has no checksum: ours (CHECKSUM_KEY) catches every flip that changes
    what would be loaded; flips in zip padding change nothing loaded and load the same state."""
    path = tmp_path / "state.pth"
    state = add_checksum(_state(0))
    atomic_torch_save(state, path)
    data = path.read_bytes()
    rng = random.Random(10)
    outcomes = {"refused": 0, "identical": 0}
    for i in range(60):
        pos, bit = rng.randrange(len(data)), 1 << rng.randrange(8)
        flipped = bytearray(data)
        flipped[pos] ^= bit
        bad = tmp_path / f"flip{i}.pth"
        bad.write_bytes(bytes(flipped))
        try:
            loaded = safe_torch_load(bad, require_checksum=True)  # as a trainer reads its own state
        except CheckpointError as exc:
            assert str(bad) in str(exc)
            outcomes["refused"] += 1
        else:
            assert _equal(loaded, state), f"byte {pos} bit {bit}: loaded a changed state"
            outcomes["identical"] += 1
    assert outcomes["refused"] > 30, outcomes


def test_a_flip_in_tensor_data_is_caught_by_the_checksum_alone(tmp_path):
    path = tmp_path / "state.pth"
    atomic_torch_save(add_checksum(_state(0)), path)
    data = bytearray(path.read_bytes())
    raw = _state(0)["model"]["w"].numpy().tobytes()
    pos = bytes(data).find(raw[:64]) + 100
    data[pos] ^= 0x01  # the lowest bit of one float: torch.load alone returns it silently
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{path}: checksum mismatch .* it was not loaded"):
        safe_torch_load(path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_torch_checkpoints_are_refused_naming_the_file(tmp_path, keep):
    path = tmp_path / "state.pth"
    atomic_torch_save(add_checksum(_state(0)), path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"{cut}: (the file is empty|truncated or corrupt)"):
        safe_torch_load(cut)


def test_checksum_covers_every_value_not_only_tensors():
    state = add_checksum(_state(0))
    for change in (lambda s: s.__setitem__("epoch", 4), lambda s: s["config"].__setitem__("lr", 0.0),
                   lambda s: s["optimizer"]["param_groups"][0].__setitem__("betas", (0.9, 0.96)),
                   lambda s: s["model"].__setitem__("b", s["model"]["b"].float())):
        other = add_checksum(_state(0))
        change(other)
        assert mio.state_checksum(other) != state[CHECKSUM_KEY]
    assert mio.state_checksum(add_checksum(_state(0))) == state[CHECKSUM_KEY]


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True), st.text(max_size=8),
    st.builds(lambda shape, dtype, seed: torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(dtype),
              st.lists(st.integers(0, 3), max_size=3), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
              st.integers(0, 1000)),
)
states = st.dictionaries(st.text(min_size=1, max_size=6), st.recursive(
    leaves, lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                                    st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 9)), inner,
                                                    max_size=3)), max_leaves=8), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=states)
def test_any_checksummed_state_survives_save_and_load_and_any_changed_leaf_is_caught(tmp_path, state):
    path = tmp_path / "s.pth"
    stamped = add_checksum(state)
    atomic_torch_save(stamped, path)
    loaded = safe_torch_load(path)  # verified
    assert mio.state_checksum(loaded) == stamped[CHECKSUM_KEY]
    key = sorted(state)[0]
    changed = dict(stamped, **{key: ["changed", state[key]]})
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        mio.verify_checksum(changed, path)


def test_bit_flips_in_our_safetensors_format_are_refused_or_change_nothing(tmp_path):
    """Tensors and metadata both carry a sha256: a flip anywhere is refused, or (in JSON
    whitespace / padding) loads exactly what was saved."""
    path = tmp_path / "enc.safetensors"
    g = torch.Generator().manual_seed(0)
    sd = {"patch_embed.proj.weight": torch.randn(8, 3, 4, 4, generator=g), "cls_token": torch.randn(1, 1, 8, generator=g)}
    save_checkpoint(sd, path, {"arch": "vit_tiny_patch16", "source": "unit test"})
    want_sd, want_meta = read_checkpoint(path)
    data = path.read_bytes()
    rng = random.Random(4)
    refused = 0
    for i in range(80):
        pos = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        bad = tmp_path / f"flip{i}.safetensors"
        bad.write_bytes(bytes(flipped))
        try:
            got_sd, got_meta = read_checkpoint(bad)
        except CheckpointError as exc:
            assert str(bad) in str(exc)
            refused += 1
        else:
            assert _equal(got_sd, want_sd) and {k: v for k, v in got_meta.items() if k != "path"} == \
                {k: v for k, v in want_meta.items() if k != "path"}, f"byte {pos}"
    assert refused > 60
