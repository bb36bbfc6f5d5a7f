"""moekit from Python: ctypes over the C ABI of ``libmoekit_capi.so`` (no compiled extension).

Arrays are numpy arrays (CPU reference, or ``device="emulated"`` for the host emulation of the
CUDA kernels) or PyTorch tensors (CUDA tensors run the GPU kernels on
``torch.cuda.current_stream()``; CPU tensors the CPU reference). BF16 numpy arrays are
``uint16`` bit patterns (see :func:`bf16` and :func:`f32`), FP8 E4M3 codes are ``uint8``.
Every array must be C-contiguous with the dtype and shape each function names; a bad
argument raises ``TypeError`` (dtype) or ``ValueError`` (anything else) before or from the
library, with the library's message. When torch is importable the ops are also registered as
``torch.ops.moekit.*`` custom ops with fake implementations, so they work under
``torch.compile``.

The library is ``$MOEKIT_LIB`` if set, else ``target/release`` or ``target/debug`` of this
repository (``cargo build -p moekit-capi``).
"""

import ctypes
import os
import pathlib

import numpy as np

__all__ = [
    "MoekitError", "lib_path", "version", "bf16", "f32", "route", "route_backward",
    "dispatch_layout", "permute", "quantize_fp8", "swiglu", "combine", "gemm_contiguous",
    "gemm_masked", "gemm_k_grouped", "gemm_dgrad", "max_rows",
]

# Status codes and enums of moekit.h.
OK, SHAPE, DTYPE, ALIGNMENT, INVALID_ARGUMENT, NULL_POINTER = 0, 1, 2, 3, 4, 5
CUDA, NO_DEVICE, NOT_BUILT, UNSUPPORTED_ARCH, KERNEL_FAULT, PANIC = 6, 7, 8, 9, 10, 11
_STATUS_NAMES = ["OK", "SHAPE", "DTYPE", "ALIGNMENT", "INVALID_ARGUMENT", "NULL_POINTER", "CUDA",
                 "NO_DEVICE", "NOT_BUILT", "UNSUPPORTED_ARCH", "KERNEL_FAULT", "PANIC"]
_DEVICES = {"cpu": 0, "emulated": 1, "cuda": 2}
_F32, _BF16, _FP8 = 0, 1, 2
_LAYOUTS = {"row_major": 0, "mn_major": 1}
_SCALE_KINDS = {"f32": 0, "ue8m0": 1}


class MoekitError(RuntimeError):
    """A failure the library reported that is not a bad argument (CUDA, not built, ...)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _error(status, message):
    name = _STATUS_NAMES[status] if 0 <= status < len(_STATUS_NAMES) else str(status)
    text = f"moekit: {message} (status {name})"
    if status == DTYPE:
        return TypeError(text)
    if status in (SHAPE, ALIGNMENT, INVALID_ARGUMENT, NULL_POINTER):
        return ValueError(text)
    return MoekitError(status, text)


class _Device(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("reserved", ctypes.c_int32), ("stream", ctypes.c_void_p)]


class _RouterConfig(ctypes.Structure):
    _fields_ = [("experts", ctypes.c_uint32), ("top_k", ctypes.c_uint32), ("score_func", ctypes.c_int32),
                ("n_groups", ctypes.c_uint32), ("topk_groups", ctypes.c_uint32),
                ("renormalize", ctypes.c_int32), ("route_scale", ctypes.c_float)]


class _DispatchConfig(ctypes.Structure):
    _fields_ = [("experts", ctypes.c_uint32), ("top_k", ctypes.c_uint32), ("align", ctypes.c_uint32),
                ("zero_padding", ctypes.c_int32)]


class _ActFormat(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int32), ("scale_kind", ctypes.c_int32), ("scale_layout", ctypes.c_int32)]


class _GemmShape(ctypes.Structure):
    _fields_ = [("groups", ctypes.c_uint64), ("m", ctypes.c_uint64), ("n", ctypes.c_uint64), ("k", ctypes.c_uint64)]


class _GemmOperand(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int32), ("scale_layout", ctypes.c_int32), ("data", ctypes.c_void_p),
                ("scales", ctypes.c_void_p)]


def lib_path():
    """The shared library this module loads."""
    env = os.environ.get("MOEKIT_LIB")
    if env:
        return pathlib.Path(env)
    root = pathlib.Path(__file__).resolve().parents[2]
    for profile in ("release", "debug"):
        p = root / "target" / profile / "libmoekit_capi.so"
        if p.is_file():
            return p
    raise OSError("libmoekit_capi.so not found: run `cargo build -p moekit-capi` or set MOEKIT_LIB")


_P, _I32, _U32, _U64, _F = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_float
_PROTOTYPES = {
    "moekit_route": [_Device, _P, _I32, _P, _U64, _P, _P, _P, _P],
    "moekit_route_backward": [_Device, _P, _I32, _P, _U64, _P, _P, _P],
    "moekit_dispatch_layout": [_Device, _P, _P, _U64, _U64, _P, _P, _P, _P, _P, _P],
    "moekit_permute": [_Device, _P, _P, _U64, _U64, _P, _P, _P, _U64, _P, _P, _P],
    "moekit_quantize": [_Device, _P, _U64, _U64, _P, _P, _P],
    "moekit_swiglu": [_Device, _P, _U64, _U64, _P, _P, _P],
    "moekit_combine": [_Device, _P, _U64, _U64, _P, _U64, _U32, _P, _P],
    "moekit_gemm_contiguous": [_Device, _GemmShape, _P, _P, _P, _P],
    "moekit_gemm_masked": [_Device, _GemmShape, _P, _P, _P, _P],
    "moekit_gemm_k_grouped": [_Device, _GemmShape, _P, _P, _P, _I32, _P],
    "moekit_gemm_dgrad": [_Device, _GemmShape, _P, _P, _P, _P],
}

_lib = None


def _load():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(lib_path()))
        for name, args in _PROTOTYPES.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = args, ctypes.c_int32
        lib.moekit_last_error.restype = ctypes.c_char_p
        lib.moekit_version.restype = ctypes.c_char_p
        lib.moekit_dispatch_max_rows.argtypes = [_U64, _U32, _U32, _U32]
        lib.moekit_dispatch_max_rows.restype = _U64
        lib.moekit_dispatch_layout_scratch_len.argtypes = [_U64, _U32, _U32]
        lib.moekit_dispatch_layout_scratch_len.restype = _U64
        _lib = lib
    return _lib


def version():
    """The library's version string."""
    return _load().moekit_version().decode()


def _call(name, *args):
    lib = _load()
    status = getattr(lib, name)(*args)
    if status != OK:
        raise _error(status, lib.moekit_last_error().decode(errors="replace"))


# ---- arrays: numpy or torch ----------------------------------------------------------------

def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def _is_torch(a):
    t = _torch()
    return t is not None and isinstance(a, t.Tensor)


_NP_DTYPES = {"f32": np.float32, "bf16": np.uint16, "fp8": np.uint8, "i32": np.int32}


def _torch_dtypes(kind):
    t = _torch()
    return {"f32": (t.float32,), "bf16": (t.bfloat16,), "i32": (t.int32,),
            "fp8": tuple(d for d in (getattr(t, "float8_e4m3fn", None), t.uint8) if d is not None)}[kind]


def bf16(x):
    """float32 values -> BF16 bit patterns (``uint16``), rounded to nearest even (NaN kept NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded)


def f32(x):
    """BF16 bit patterns (``uint16``) -> float32."""
    return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class _Call:
    """The arrays of one call: checks dtype, contiguity, shape and device; gives pointers."""

    def __init__(self, device):
        self.device = device  # None: from the arrays
        self.torch_device = None
        self.arrays = []

    def arg(self, a, kind, shape, name, optional=False):
        if a is None:
            if optional:
                return None
            raise ValueError(f"moekit: `{name}` is required")
        shape = tuple(int(s) for s in shape)
        if _is_torch(a):
            if a.dtype not in _torch_dtypes(kind):
                raise TypeError(f"moekit: `{name}` has dtype {a.dtype}, expected {_torch_dtypes(kind)}")
            if not a.is_contiguous():
                raise ValueError(f"moekit: `{name}` is not contiguous")
            dev = a.device
            if self.torch_device is None:
                self.torch_device = dev
            elif dev != self.torch_device:
                raise ValueError(f"moekit: `{name}` is on {dev}, other arguments on {self.torch_device}")
            ptr = a.data_ptr()
        elif isinstance(a, np.ndarray):
            if a.dtype != _NP_DTYPES[kind]:
                raise TypeError(f"moekit: `{name}` has dtype {a.dtype}, expected {np.dtype(_NP_DTYPES[kind])}")
            if not a.flags.c_contiguous:
                raise ValueError(f"moekit: `{name}` is not C-contiguous")
            if self.torch_device is not None and self.torch_device.type != "cpu":
                raise ValueError(f"moekit: `{name}` is a numpy array, other arguments are on {self.torch_device}")
            ptr = a.ctypes.data
        else:
            raise TypeError(f"moekit: `{name}` must be a numpy array or a torch tensor, got {type(a).__name__}")
        if tuple(a.shape) != shape:
            raise ValueError(f"moekit: `{name}` has shape {tuple(a.shape)}, expected {shape}")
        self.arrays.append(a)
        return ptr or None

    def new(self, kind, shape, like, zeros=False):
        """An output on the device of `like` (an input of this call)."""
        shape = tuple(int(s) for s in shape)
        if _is_torch(like):
            t = _torch()
            dt = {"f32": t.float32, "bf16": t.bfloat16, "i32": t.int32,
                  "fp8": getattr(t, "float8_e4m3fn", t.uint8)}[kind]
            return (t.zeros if zeros else t.empty)(shape, dtype=dt, device=like.device)
        return (np.zeros if zeros else np.empty)(shape, dtype=_NP_DTYPES[kind])

    def dev(self):
        kind = self.device or "cpu"
        if self.torch_device is not None and self.torch_device.type == "cuda":
            if self.device not in (None, "cuda"):
                raise ValueError(f"moekit: CUDA tensors cannot run on device={self.device!r}")
            t = _torch()
            stream = t.cuda.current_stream(self.torch_device).cuda_stream
            return _Device(_DEVICES["cuda"], 0, stream)
        if kind not in ("cpu", "emulated"):
            raise ValueError(f"moekit: device={kind!r} needs CUDA tensors (host arrays run on 'cpu' or 'emulated')")
        return _Device(_DEVICES[kind], 0, None)


def _shape(a):
    return tuple(int(s) for s in a.shape)


def _logits_kind(logits):
    dt = str(logits.dtype)
    return "bf16" if dt in ("uint16", "torch.bfloat16") else "f32"


# ---- ops ---------------------------------------------------------------------------------------

def _router(experts, top_k, score, n_groups, topk_groups, renormalize, route_scale):
    scores = {"softmax": 0, "sigmoid": 1}
    if score not in scores:
        raise ValueError(f"moekit: score={score!r} (softmax or sigmoid)")
    return _RouterConfig(experts, top_k, scores[score], n_groups, topk_groups, int(bool(renormalize)),
                         route_scale)


def route(logits, top_k, *, score="softmax", n_groups=1, topk_groups=1, renormalize=False, route_scale=1.0,
          bias=None, counts=None, device=None):
    """Top-k routing of ``logits [T, E]`` (f32, or BF16) with the optional selection ``bias [E]``
    (f32). Returns ``(topk_ids [T, k] int32, topk_weights [T, k] f32)``; adds each choice to
    ``counts [E]`` (int32, in place) when given. Same ids and weight bits on every device."""
    c = _Call(device)
    if len(_shape(logits)) != 2:
        raise ValueError(f"moekit: logits must be [T, E], got shape {_shape(logits)}")
    t, e = _shape(logits)
    kind = _logits_kind(logits)
    p_logits = c.arg(logits, kind, (t, e), "logits")
    p_bias = c.arg(bias, "f32", (e,), "bias", optional=True)
    p_counts = c.arg(counts, "i32", (e,), "counts", optional=True)
    ids, weights = c.new("i32", (t, top_k), logits), c.new("f32", (t, top_k), logits)
    cfg = _router(e, top_k, score, n_groups, topk_groups, renormalize, route_scale)
    _call("moekit_route", c.dev(), ctypes.byref(cfg), _BF16 if kind == "bf16" else _F32, p_logits, t, p_bias,
          c.arg(ids, "i32", (t, top_k), "topk_ids"), c.arg(weights, "f32", (t, top_k), "topk_weights"), p_counts)
    return ids, weights


def route_backward(logits, topk_ids, grad_weights, *, score="softmax", n_groups=1, topk_groups=1,
                   renormalize=False, route_scale=1.0, device=None):
    """Gradient w.r.t. ``logits [T, E]`` from ``grad_weights [T, k]`` (f32) and the forward's
    ``topk_ids [T, k]`` (int32). Returns ``grad_logits [T, E]`` f32."""
    c = _Call(device)
    t, e = _shape(logits)
    k = _shape(topk_ids)[-1]
    kind = _logits_kind(logits)
    args = [c.arg(logits, kind, (t, e), "logits"), t, c.arg(topk_ids, "i32", (t, k), "topk_ids"),
            c.arg(grad_weights, "f32", (t, k), "grad_weights")]
    grad = c.new("f32", (t, e), logits)
    cfg = _router(e, k, score, n_groups, topk_groups, renormalize, route_scale)
    _call("moekit_route_backward", c.dev(), ctypes.byref(cfg), _BF16 if kind == "bf16" else _F32, *args,
          c.arg(grad, "f32", (t, e), "grad_logits"))
    return grad


def max_rows(tokens, top_k, experts, align=128):
    """Upper bound of the rows a dispatch uses (every row-indexed buffer's size)."""
    return int(_load().moekit_dispatch_max_rows(tokens, top_k, experts, align))


def dispatch_layout(topk_ids, experts, *, align=128, rows=None, device=None):
    """The dispatch layout of ``topk_ids [T, k]`` (int32, -1 = not routed). Returns a dict of
    ``offsets [E+1]``, ``counts [E]``, ``row_map [T, k]``, ``m_indices [rows]`` and ``status [2]``
    (invalid ids, rows needed), with ``rows`` = :func:`max_rows` unless given."""
    c = _Call(device)
    t, k = _shape(topk_ids)
    rows = max_rows(t, k, experts, align) if rows is None else rows
    p_ids = c.arg(topk_ids, "i32", (t, k), "topk_ids")
    scratch_len = int(_load().moekit_dispatch_layout_scratch_len(t, k, experts))
    out = {"offsets": (experts + 1,), "counts": (experts,), "row_map": (t, k), "m_indices": (rows,), "status": (2,)}
    out = {name: c.new("i32", shape, topk_ids) for name, shape in out.items()}
    scratch = c.new("i32", (scratch_len,), topk_ids)
    cfg = _DispatchConfig(experts, k, align, 0)
    _call("moekit_dispatch_layout", c.dev(), ctypes.byref(cfg), p_ids, t, rows,
          c.arg(scratch, "i32", (scratch_len,), "scratch"),
          *[c.arg(a, "i32", _shape(a), name) for name, a in out.items()])
    return out


def _act_format(fp8, scale_kind, scale_layout):
    if not fp8:
        return _ActFormat(_BF16, 0, 0)
    return _ActFormat(_FP8, _SCALE_KINDS[scale_kind], _LAYOUTS[scale_layout])


def _scale_len(rows, cols, layout):
    return (rows if layout == "row_major" else (rows + 3) // 4 * 4) * (cols // 128)


def _act_out(c, like, rows, cols, fp8, scale_layout):
    """Output data and (FP8) scales for a [rows, cols] activation, and their pointers."""
    data = c.new("fp8" if fp8 else "bf16", (rows, cols), like)
    scales = c.new("f32", (_scale_len(rows, cols, scale_layout),), like) if fp8 else None
    ptrs = [c.arg(data, "fp8" if fp8 else "bf16", (rows, cols), "out"),
            c.arg(scales, "f32", _shape(scales), "scales") if fp8 else None]
    return data, scales, ptrs


def permute(x, layout, top_k, *, fp8=False, scale_kind="f32", scale_layout="row_major", zero_padding=False,
            align=128, device=None):
    """Permutes ``x [T, H]`` (BF16) to the rows of ``layout`` (from :func:`dispatch_layout`):
    ``[rows, H]`` BF16, or FP8 E4M3 codes and their 1x128 scales (``(codes, scales)``)."""
    c = _Call(device)
    t, h = _shape(x)
    experts = _shape(layout["counts"])[0]
    rows = _shape(layout["m_indices"])[0]
    ins = [c.arg(x, "bf16", (t, h), "x"), t, h, c.arg(layout["row_map"], "i32", (t, top_k), "row_map"),
           c.arg(layout["offsets"], "i32", (experts + 1,), "offsets"),
           c.arg(layout["counts"], "i32", (experts,), "counts"), rows]
    data, scales, outs = _act_out(c, x, rows, h, fp8, scale_layout)
    cfg, fmt = _DispatchConfig(experts, top_k, align, int(zero_padding)), _act_format(fp8, scale_kind, scale_layout)
    _call("moekit_permute", c.dev(), ctypes.byref(cfg), *ins, ctypes.byref(fmt), *outs)
    return (data, scales) if fp8 else data


def _rowwise(name, x, cols, fp8, scale_kind, scale_layout, device):
    c = _Call(device)
    rows, in_cols = _shape(x)
    p_x = c.arg(x, "bf16", (rows, in_cols), "x")
    data, scales, outs = _act_out(c, x, rows, cols, fp8, scale_layout)
    fmt = _act_format(fp8, scale_kind, scale_layout)
    _call(name, c.dev(), p_x, rows, cols, ctypes.byref(fmt), *outs)
    return (data, scales) if fp8 else data


def quantize_fp8(x, *, scale_kind="f32", scale_layout="row_major", device=None):
    """1x128 FP8 E4M3 quantization of ``x [rows, cols]`` (BF16): ``(codes, scales)``."""
    return _rowwise("moekit_quantize", x, _shape(x)[1], True, scale_kind, scale_layout, device)


def swiglu(x, *, fp8=False, scale_kind="f32", scale_layout="row_major", device=None):
    """SwiGLU of ``x [rows, 2 I]`` (BF16, gate columns first): ``[rows, I]`` BF16, or FP8 codes
    and scales."""
    return _rowwise("moekit_swiglu", x, _shape(x)[1] // 2, fp8, scale_kind, scale_layout, device)


def combine(y, row_map, weights=None, *, device=None):
    """``out [T, H] = sum_j weights[t, j] y[row_map[t, j]]`` (BF16 out, f32 accumulation in slot
    order) from ``y [rows, H]`` (BF16), ``row_map [T, k]`` (int32) and ``weights [T, k]`` (f32;
    None: unweighted)."""
    c = _Call(device)
    rows, h = _shape(y)
    t, k = _shape(row_map)
    ins = [c.arg(y, "bf16", (rows, h), "y"), rows, h, c.arg(row_map, "i32", (t, k), "row_map"), t, k,
           c.arg(weights, "f32", (t, k), "weights", optional=True)]
    out = c.new("bf16", (t, h), y)
    _call("moekit_combine", c.dev(), *ins, c.arg(out, "bf16", (t, h), "out"))
    return out


def _operand(c, data, scales, shape, name, scale_layout):
    fp8 = scales is not None
    p = c.arg(data, "fp8" if fp8 else "bf16", shape, name)
    s = c.arg(scales, "f32", _shape(scales), f"{name} scales") if fp8 else None
    return _GemmOperand(_FP8 if fp8 else _BF16, _LAYOUTS[scale_layout], p, s)


def _gemm(name, shape, a, b, d_kind, d_shape, extra, device, a_scale_layout="row_major", out=None):
    """One grouped GEMM: ``a``, ``b`` = (data, scales or None, shape, name)."""
    c = _Call(device)
    opa = _operand(c, *a, a_scale_layout)
    opb = _operand(c, *b, "row_major")
    ids = [c.arg(v, "i32", s, n, optional=opt) if isinstance(s, tuple) else v for v, s, n, opt in extra]
    d = c.new(d_kind, d_shape, a[0], zeros=True) if out is None else out
    p_d = c.arg(d, d_kind, d_shape, "out")
    _call(name, c.dev(), _GemmShape(*shape), ctypes.byref(opa), ctypes.byref(opb), *ids, p_d)
    return d


def gemm_contiguous(a, b, m_indices, *, a_scales=None, b_scales=None, a_scale_layout="row_major", device=None):
    """m-grouped contiguous: ``d [m, n]`` (BF16) rows with ``0 <= m_indices[r] < G`` get ``a[r] .
    b[m_indices[r]]^T``; other rows stay zero. ``a [m, k]``, ``b [G, n, k]`` BF16, or FP8 codes
    with ``a_scales`` (1x128) and ``b_scales [G, n/128, k/128]``."""
    (m, k), (g, n, _) = _shape(a), _shape(b)
    return _gemm("moekit_gemm_contiguous", (g, m, n, k), (a, a_scales, (m, k), "a"), (b, b_scales, (g, n, k), "b"),
                 "bf16", (m, n), [(m_indices, (m,), "m_indices", False)], device, a_scale_layout)


def gemm_masked(a, b, masked_m=None, *, a_scales=None, b_scales=None, a_scale_layout="row_major", device=None):
    """m-grouped masked: ``d [G, m, n]`` rows below ``masked_m[g]`` (int32 ``[G]``, None: all) get
    ``a[g, r] . b[g]^T`` from ``a [G, m, k]``, ``b [G, n, k]``."""
    (g, m, k), (_, n, _) = _shape(a), _shape(b)
    return _gemm("moekit_gemm_masked", (g, m, n, k), (a, a_scales, (g, m, k), "a"), (b, b_scales, (g, n, k), "b"),
                 "bf16", (g, m, n), [(masked_m, (g,), "masked_m", True)], device, a_scale_layout)


def gemm_k_grouped(a, b, offsets, *, a_scales=None, b_scales=None, out=None, device=None):
    """k-grouped weight gradient ``d [G, n, k]`` f32 (added to ``out`` when given) over the token
    groups ``offsets [G + 1]``. BF16: ``a = dY [m, n]``, ``b = X [m, k]``; FP8: ``a = dY^T [n,
    m]``, ``b = X^T [k, m]`` with row-major 1x128 scales along the tokens."""
    fp8 = a_scales is not None
    g = _shape(offsets)[0] - 1
    if fp8:
        (n, m), (k, _) = _shape(a), _shape(b)
    else:
        (m, n), (_, k) = _shape(a), _shape(b)
    a_shape, b_shape = ((n, m), (k, m)) if fp8 else ((m, n), (m, k))
    acc = 0 if out is None else 1
    return _gemm("moekit_gemm_k_grouped", (g, m, n, k), (a, a_scales, a_shape, "a"), (b, b_scales, b_shape, "b"),
                 "f32", (g, n, k), [(offsets, (g + 1,), "offsets", False), (acc, None, "accumulate", False)],
                 device, out=out)


def gemm_dgrad(dy, w, m_indices, *, dy_scales=None, w_scales=None, dy_scale_layout="row_major", device=None):
    """Activation gradient ``dx [m, k]`` (BF16) rows with a valid ``m_indices`` get ``dy[r] .
    w[m_indices[r]]`` from ``dy [m, n]`` and the forward weights ``w [G, n, k]``."""
    (m, n), (g, _, k) = _shape(dy), _shape(w)
    return _gemm("moekit_gemm_dgrad", (g, m, n, k), (dy, dy_scales, (m, n), "dy"), (w, w_scales, (g, n, k), "w"),
                 "bf16", (m, k), [(m_indices, (m,), "m_indices", False)], device, dy_scale_layout)


# ---- torch custom ops (torch.compile) ------------------------------------------------------------

def _register_torch_ops(torch):
    if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):
        return

    @torch.library.custom_op("moekit::route", mutates_args=())
    def _route(logits: torch.Tensor, top_k: int, score: str, n_groups: int, topk_groups: int,
               renormalize: bool, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return route(logits, top_k, score=score, n_groups=n_groups, topk_groups=topk_groups,
                     renormalize=renormalize, route_scale=route_scale)

    @_route.register_fake
    def _(logits, top_k, score, n_groups, topk_groups, renormalize, route_scale):
        t = logits.shape[0]
        return (logits.new_empty((t, top_k), dtype=torch.int32), logits.new_empty((t, top_k), dtype=torch.float32))

    @torch.library.custom_op("moekit::combine", mutates_args=())
    def _combine(y: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        return combine(y, row_map, weights)

    @_combine.register_fake
    def _(y, row_map, weights):
        return y.new_empty((row_map.shape[0], y.shape[1]))

    @torch.library.custom_op("moekit::gemm_contiguous", mutates_args=())
    def _gemm_contiguous(a: torch.Tensor, b: torch.Tensor, m_indices: torch.Tensor) -> torch.Tensor:
        return gemm_contiguous(a, b, m_indices)

    @_gemm_contiguous.register_fake
    def _(a, b, m_indices):
        return a.new_empty((a.shape[0], b.shape[1]))

    @torch.library.custom_op("moekit::quantize_fp8", mutates_args=())
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8(x)

    @_quantize.register_fake
    def _(x):
        rows, cols = x.shape
        return (x.new_empty((rows, cols), dtype=getattr(torch, "float8_e4m3fn", torch.uint8)),
                x.new_empty((rows * (cols // 128),), dtype=torch.float32))


_t = _torch()
if _t is not None:
    _register_torch_ops(_t)
del _t
