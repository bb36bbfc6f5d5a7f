"""The Python module on PyTorch tensors (CPU tensors: the reference; CUDA tensors: the GPU
kernels on the current stream) and as torch custom ops. Skipped visibly without torch."""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

try:
    import torch
except ImportError:
    torch = None

import moekit  # noqa: E402


@unittest.skipIf(torch is None, "torch is not installed")
class TorchCpu(unittest.TestCase):
    def test_route_on_cpu_tensors_matches_numpy(self):
        logits = torch.arange(16, dtype=torch.float32).mul(7).remainder(11).mul(0.1).reshape(2, 8)
        ids, w = moekit.route(logits, 2, renormalize=True)
        ref_ids, ref_w = moekit.route(logits.numpy(), 2, renormalize=True)
        self.assertEqual(ids.tolist(), ref_ids.tolist())
        self.assertTrue(torch.equal(w, torch.from_numpy(ref_w)))

    def test_custom_ops_under_compile(self):
        if not hasattr(torch.library, "custom_op"):
            self.skipTest("torch.library.custom_op needs torch >= 2.4")
        logits = torch.randn(32, 64)

        def f(x):
            return torch.ops.moekit.route(x, 4, "softmax", 1, 1, True, 1.0)

        eager = f(logits)
        compiled = torch.compile(f, backend="eager", fullgraph=True)(logits)
        self.assertTrue(torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1]))

    def test_bad_dtype_is_a_type_error(self):
        with self.assertRaises(TypeError):
            moekit.route(torch.zeros(2, 8, dtype=torch.float64), 2)


@unittest.skipIf(torch is None or not torch.cuda.is_available(), "no torch with CUDA")
class TorchCuda(unittest.TestCase):
    def test_cuda_routing_is_bit_identical_to_the_cpu(self):
        logits = torch.randn(256, 256)
        cfg = dict(score="sigmoid", n_groups=8, topk_groups=4, renormalize=True, route_scale=2.5)
        cpu = moekit.route(logits, 8, **cfg)
        gpu = moekit.route(logits.cuda(), 8, **cfg)
        torch.cuda.current_stream().synchronize()
        self.assertTrue(torch.equal(cpu[0], gpu[0].cpu()))
        self.assertTrue(torch.equal(cpu[1].view(torch.int32), gpu[1].cpu().view(torch.int32)))

    def test_cuda_gemm_contiguous_matches_the_cpu(self):
        a = torch.randn(256, 128).bfloat16()
        b = torch.randn(2, 128, 128).bfloat16()
        m = torch.tensor([0] * 128 + [1] * 100 + [-1] * 28, dtype=torch.int32)
        cpu = moekit.gemm_contiguous(a, b, m).float()
        gpu = moekit.gemm_contiguous(a.cuda(), b.cuda(), m.cuda()).float().cpu()
        self.assertLess((cpu - gpu).abs().max().item(), 0.1)


if __name__ == "__main__":
    unittest.main()
