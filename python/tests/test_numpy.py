"""The Python module on numpy arrays: the CPU reference and the host emulation."""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

import moekit  # noqa: E402

MIXTRAL = dict(score="softmax", renormalize=True)


def logits_example():
    return (np.arange(16) * 7 % 11 * 0.1).astype(np.float32).reshape(2, 8)


def emulator_or_skip(test):
    """Runs a tiny call on the emulator; skips visibly when it is not built (fails when
    MOEKIT_REQUIRE_KERNELS=1, as in CI)."""
    try:
        moekit.route(logits_example(), 2, device="emulated", **MIXTRAL)
    except moekit.MoekitError as e:
        if e.status != moekit.NOT_BUILT or os.environ.get("MOEKIT_REQUIRE_KERNELS") == "1":
            raise
        test.skipTest(f"the emulation is not built: {e}")


class KnownValues(unittest.TestCase):
    def test_version(self):
        self.assertRegex(moekit.version(), r"^\d+\.\d+\.\d+")

    def test_route_matches_the_documented_example(self):
        counts = np.ones(8, dtype=np.int32)
        ids, w = moekit.route(logits_example(), 2, counts=counts, **MIXTRAL)
        self.assertEqual(ids.tolist(), [[3, 6], [6, 1]])
        self.assertAlmostEqual(float(w[0].sum()), 1.0, places=6)
        self.assertEqual(counts.tolist(), [1, 2, 1, 2, 1, 1, 3, 1])

    def test_layout_permute_combine_round_trip(self):
        ids = np.array([[2, 0], [2, 1], [3, -1]], dtype=np.int32)
        layout = moekit.dispatch_layout(ids, 4, align=16)
        self.assertEqual(layout["offsets"].tolist(), [0, 16, 32, 48, 64])
        self.assertEqual(layout["row_map"].tolist(), [[32, 0], [33, 16], [48, -1]])
        self.assertEqual(layout["status"].tolist(), [0, 64])
        x = moekit.bf16(np.arange(24, dtype=np.float32).reshape(3, 8))
        p = moekit.permute(x, layout, 2, align=16)
        np.testing.assert_array_equal(p[32], x[0])
        np.testing.assert_array_equal(p[16], x[1])
        back = moekit.f32(moekit.combine(p, layout["row_map"]))
        np.testing.assert_array_equal(back[1], 2 * moekit.f32(x[1]))

    def test_fp8_quantization_codes(self):
        row = np.zeros((1, 128), dtype=np.float32)
        row[0, :3] = [448.0, 1.0, -2.0]
        codes, scales = moekit.quantize_fp8(moekit.bf16(row))
        self.assertEqual(scales.tolist(), [1.0])
        self.assertEqual(codes[0, :4].tolist(), [0x7E, 0x38, 0xC0, 0])

    def test_gemm_contiguous_and_padding_rows(self):
        a = moekit.bf16(np.add.outer(np.arange(4), np.arange(8)).astype(np.float32))
        b = moekit.bf16(np.stack([np.eye(8, dtype=np.float32) * (g + 1) for g in range(2)]))
        d = moekit.f32(moekit.gemm_contiguous(a, b, np.array([0, 1, -1, 1], dtype=np.int32)))
        np.testing.assert_array_equal(d[0], moekit.f32(a[0]))
        np.testing.assert_array_equal(d[1], 2 * moekit.f32(a[1]))
        np.testing.assert_array_equal(d[2], np.zeros(8, dtype=np.float32))

    def test_swiglu_bf16_is_silu_gate_times_up(self):
        x = moekit.bf16(np.array([[0.0] * 8 + [1.0] * 8, [2.0] * 8 + [3.0] * 8], dtype=np.float32))
        out = moekit.f32(moekit.swiglu(x))
        self.assertEqual(out[0].tolist(), [0.0] * 8)
        silu2 = 2.0 / (1.0 + np.exp(-2.0))
        np.testing.assert_allclose(out[1], silu2 * 3.0, rtol=1e-2)


class Errors(unittest.TestCase):
    def test_wrong_dtype_is_a_type_error(self):
        with self.assertRaisesRegex(TypeError, "logits|dtype"):
            moekit.route(logits_example().astype(np.float64), 2)

    def test_non_contiguous_is_a_value_error(self):
        x = moekit.bf16(np.zeros((4, 16), dtype=np.float32))[:, ::2]
        with self.assertRaisesRegex(ValueError, "contiguous"):
            moekit.combine(x, np.zeros((4, 1), dtype=np.int32))

    def test_library_messages_come_through(self):
        with self.assertRaisesRegex(ValueError, r"top_k = 9.*status INVALID_ARGUMENT"):
            moekit.route(logits_example(), 9)
        y = moekit.bf16(np.zeros((4, 6), dtype=np.float32))
        with self.assertRaisesRegex(ValueError, "status ALIGNMENT"):
            moekit.combine(y, np.zeros((4, 1), dtype=np.int32))
        a = moekit.bf16(np.zeros((8, 128), dtype=np.float32))
        with self.assertRaisesRegex(TypeError, "status DTYPE"):
            moekit.gemm_contiguous(a, np.zeros((1, 128, 128), dtype=np.uint8), np.zeros(8, dtype=np.int32),
                                   b_scales=np.ones(1, dtype=np.float32))

    def test_unknown_device(self):
        with self.assertRaisesRegex(ValueError, "device"):
            moekit.route(logits_example(), 2, device="tpu")


class Emulated(unittest.TestCase):
    def setUp(self):
        emulator_or_skip(self)

    def test_routing_is_bit_identical_to_the_cpu(self):
        rng = np.random.default_rng(0)
        logits = rng.standard_normal((64, 256)).astype(np.float32)
        bias = rng.standard_normal(256).astype(np.float32) * 0.01
        cfg = dict(score="sigmoid", n_groups=8, topk_groups=4, renormalize=True, route_scale=2.5, bias=bias)
        cpu = moekit.route(logits, 8, **cfg)
        emu = moekit.route(logits, 8, device="emulated", **cfg)
        np.testing.assert_array_equal(cpu[0], emu[0])
        np.testing.assert_array_equal(cpu[1].view(np.uint32), emu[1].view(np.uint32))

    def test_fp8_permute_and_gemm_match_the_cpu(self):
        rng = np.random.default_rng(1)
        t, h, e, k = 16, 128, 4, 2
        ids = rng.integers(0, e, (t, k)).astype(np.int32)
        x = moekit.bf16(rng.standard_normal((t, h)).astype(np.float32))
        outs = []
        for dev in ("cpu", "emulated"):
            layout = moekit.dispatch_layout(ids, e, device=dev)
            codes, scales = moekit.permute(x, layout, k, fp8=True, device=dev)
            outs.append((layout["m_indices"], codes, scales))
        np.testing.assert_array_equal(outs[0][0], outs[1][0])
        used = outs[0][0] >= 0
        np.testing.assert_array_equal(outs[0][1][used], outs[1][1][used])
        np.testing.assert_array_equal(outs[0][2][used], outs[1][2][used])


if __name__ == "__main__":
    unittest.main()
