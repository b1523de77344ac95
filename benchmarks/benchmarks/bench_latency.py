"""Small-call latency: one forward (or backward) on small inputs, where per-call overhead and
not bandwidth decides; cinstnorm beside torch, onnxruntime, OpenVINO and numba.

The shapes are those of ``python -m cinstnorm bench``'s latency table. Each peer is imported in
``setup`` and skips its benchmarks (``NotImplementedError``) when it is not installed, as
``bench_torch.py`` does for torch; onnxruntime also skips float64 (its CPU provider has no
float64 InstanceNormalization kernel). The peers are set up here, not imported from
``cinstnorm._peers``, so that the suite times the same thing at every commit asv checks out:
a one-node ONNX ``InstanceNormalization`` model on preallocated arrays (io binding; an infer
request on tensors that share the arrays' memory) and a numba ``@njit`` two-pass reference.
"""
import functools

import numpy as np

import cinstnorm as cin

from .common import EPS, import_torch, thread_counts, warm_up_once

LATENCY_SHAPES = {"2x3x8x8": (2, 3, 8, 8), "1x64x16x16": (1, 64, 16, 16)}


@functools.lru_cache(maxsize=None)
def latency_inputs(shape_name, dtype):
    """(x, dy, weight, bias, mean, rstd) of a latency shape from fixed seeds."""
    shape = LATENCY_SHAPES[shape_name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=dtype)
    dy = rng.standard_normal(shape, dtype=dtype)
    weight = (1.0 + 0.1 * rng.standard_normal(shape[1])).astype(dtype)
    bias = (0.1 * rng.standard_normal(shape[1])).astype(dtype)
    _, mean, rstd = cin.instance_norm_forward(x, weight, bias, EPS)
    return x, dy, weight, bias, mean, rstd


def import_peer(*modules):
    """The modules, or NotImplementedError (asv's "skip") when one is not installed."""
    import importlib

    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise NotImplementedError(f"{exc.name} is not installed") from None


def instance_norm_model_bytes(onnx, shape, dtype):
    """A serialized one-node ONNX InstanceNormalization model (x, scale, B) -> y."""
    helper = onnx.helper
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node("InstanceNormalization", ["x", "scale", "B"], ["y"], epsilon=EPS)
    graph = helper.make_graph(
        [node], "instance_norm",
        [helper.make_tensor_value_info("x", elem, list(shape)),
         helper.make_tensor_value_info("scale", elem, [shape[1]]),
         helper.make_tensor_value_info("B", elem, [shape[1]])],
        [helper.make_tensor_value_info("y", elem, list(shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class _Latency:
    params = [list(LATENCY_SHAPES), ["float32", "float64"], thread_counts()]
    param_names = ["shape", "dtype", "n_threads"]
    timeout = 120

    def setup(self, shape, dtype, n_threads):
        self.x, self.dy, self.weight, self.bias, self.mean, self.rstd = latency_inputs(
            shape, dtype)
        self.out = np.zeros_like(self.x)


class Latency(_Latency):
    """cinstnorm's forward (allocating and into ``out=``) and backward from saved statistics."""

    def setup(self, shape, dtype, n_threads):
        super().setup(shape, dtype, n_threads)
        warm_up_once("latency", lambda: self.time_forward(shape, dtype, n_threads))

    def time_forward(self, shape, dtype, n_threads):
        cin.instance_norm_forward(self.x, self.weight, self.bias, EPS, n_threads=n_threads)

    def time_forward_out(self, shape, dtype, n_threads):
        cin.instance_norm_forward(self.x, self.weight, self.bias, EPS, n_threads=n_threads,
                                  out=self.out)

    def time_backward(self, shape, dtype, n_threads):
        cin.instance_norm_backward(self.dy, self.x, self.mean, self.rstd, self.weight,
                                   n_threads=n_threads)


class LatencyTorch(_Latency):
    """torch ``F.instance_norm`` forward under ``no_grad``."""

    def setup(self, shape, dtype, n_threads):
        super().setup(shape, dtype, n_threads)
        self.torch = import_torch()
        self.saved_threads = self.torch.get_num_threads()
        self.torch.set_num_threads(n_threads)
        self.xt, self.wt, self.bt = (self.torch.from_numpy(a)
                                     for a in (self.x, self.weight, self.bias))
        warm_up_once("latency torch", lambda: self.time_torch_forward(shape, dtype, n_threads))

    def teardown(self, shape, dtype, n_threads):
        self.torch.set_num_threads(self.saved_threads)

    def time_torch_forward(self, shape, dtype, n_threads):
        with self.torch.no_grad():
            self.torch.nn.functional.instance_norm(self.xt, weight=self.wt, bias=self.bt,
                                                   eps=EPS)


class LatencyOnnxruntime(_Latency):
    """onnxruntime: ``run_with_iobinding`` with inputs and output bound to the arrays;
    ``intra_op_num_threads`` = n_threads, one inter-op thread, sequential execution."""

    def setup(self, shape, dtype, n_threads):
        super().setup(shape, dtype, n_threads)
        onnx, ort = import_peer("onnx", "onnxruntime")
        if dtype == "float64":
            raise NotImplementedError("onnxruntime has no float64 InstanceNormalization on CPU")
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            instance_norm_model_bytes(onnx, self.x.shape, dtype), options,
            providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        for name, a in (("x", self.x), ("scale", self.weight), ("B", self.bias)):
            self.binding.bind_cpu_input(name, a)
        self.out_value = ort.OrtValue.ortvalue_from_numpy(self.out)  # shares self.out
        self.binding.bind_ortvalue_output("y", self.out_value)
        self.time_onnxruntime_forward(shape, dtype, n_threads)  # the thread pool starts

    def time_onnxruntime_forward(self, shape, dtype, n_threads):
        self.session.run_with_iobinding(self.binding)


class LatencyOpenVINO(_Latency):
    """OpenVINO CPU plugin (``INFERENCE_NUM_THREADS`` = n_threads, one stream, f32): an infer
    request on tensors that share the arrays' memory."""

    def setup(self, shape, dtype, n_threads):
        super().setup(shape, dtype, n_threads)
        onnx, ov = import_peer("onnx", "openvino")
        core = ov.Core()
        model = core.read_model(instance_norm_model_bytes(onnx, self.x.shape, dtype))
        compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": n_threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": False})
        self.request = compiled.create_infer_request()
        for i, a in enumerate((self.x, self.weight, self.bias)):
            self.request.set_input_tensor(i, ov.Tensor(a, shared_memory=True))
        self.request.set_output_tensor(0, ov.Tensor(self.out, shared_memory=True))
        self.time_openvino_forward(shape, dtype, n_threads)

    def time_openvino_forward(self, shape, dtype, n_threads):
        self.request.infer(share_outputs=True)


@functools.lru_cache(maxsize=1)
def numba_forward():
    """A two-pass reference forward on (N, C, M) arrays, compiled by numba (one thread)."""
    (numba,) = import_peer("numba")

    @numba.njit(parallel=False, cache=False)
    def forward(x, weight, bias, eps, out):
        for n in range(x.shape[0]):
            for c in range(x.shape[1]):
                total = 0.0
                for i in range(x.shape[2]):
                    total += x[n, c, i]
                mean = total / x.shape[2]
                squares = 0.0
                for i in range(x.shape[2]):
                    squares += (x[n, c, i] - mean) ** 2
                alpha = weight[c] / np.sqrt(squares / x.shape[2] + eps)
                for i in range(x.shape[2]):
                    out[n, c, i] = (x[n, c, i] - mean) * alpha + bias[c]

    return forward


class LatencyNumba:
    """numba's ``@njit`` reference forward into a preallocated array (single-threaded)."""

    params = _Latency.params[:2]
    param_names = _Latency.param_names[:2]
    timeout = 120

    def setup(self, shape, dtype):
        x, _, self.weight, self.bias, _, _ = latency_inputs(shape, dtype)
        self.forward = numba_forward()
        self.x3 = x.reshape(x.shape[0], x.shape[1], -1)
        self.out3 = np.zeros_like(self.x3)
        self.time_numba_forward(shape, dtype)  # compiles for this dtype

    def time_numba_forward(self, shape, dtype):
        self.forward(self.x3, self.weight, self.bias, EPS, self.out3)
