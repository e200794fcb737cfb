"""RuntimeM2D.compile(): torch.compile of the encoder gives the eager numbers."""

import torch

import m2d


def test_compiled_runtime_matches_eager(small_ckpt):
    rt = m2d.RuntimeM2D(small_ckpt)
    wav = torch.rand(2, 20000) * 2 - 1
    with torch.inference_mode():
        eager = rt.encode(wav)
        compiled = rt.compile().encode(wav)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert set(rt.state_dict()) == set(m2d.RuntimeM2D(small_ckpt).state_dict())  # keys unchanged
