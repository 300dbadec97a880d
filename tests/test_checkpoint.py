"""Checkpoints: a corrupt or truncated newest checkpoint falls back to the previous one."""


import pytest
import torch

from fedlora.checkpoint import latest_checkpoint, save_checkpoint


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})
    newest = save_checkpoint(tmp_path, 2, {"x": torch.full((3,), 2.0)})
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        rnd, payload = latest_checkpoint(tmp_path)
    assert rnd == 1 and torch.equal(payload["x"], torch.ones(3))
    newest.write_bytes(bytes(data[:20]))  # truncated
    with pytest.warns(UserWarning, match="truncated"):
        assert latest_checkpoint(tmp_path)[0] == 1
