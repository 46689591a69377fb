"""
An emulated accelerator for CPU-only tests: device "fakegpu", whose tensors hold a real CPU tensor and obey CUDA's
device rule, so a device bug (a CPU tensor mixed into GPU math) raises here as it would on a GPU.

    import fake_gpu; fake_gpu.install()         # once per process: it registers PyTorch's PrivateUse1 backend
    model.to("fakegpu"); train.main(cfg)        # every op runs on the CPU; mixing devices raises

What it enforces, as CUDA does: an op that takes a tensor on "fakegpu" and a CPU tensor of one or more dimensions
raises "Expected all tensors to be on the same device"; a CPU scalar (0-d) tensor may join; copies between devices
(`.to`, `copy_`) are allowed, and so is indexing a device tensor with CPU indices, but not a CPU tensor with device
indices. What it does not cover: a generator's device (torch.Generator("fakegpu") is a CPU generator: Python backends
cannot make their own), bf16 and other dtype behaviour of GPU kernels, memory, bitsandbytes (a 4-bit Linear cannot
wrap these tensors, so tests run the planner unquantized), streams and asynchrony.
Registration is process-wide and cannot be undone (torch.Generator is replaced and a TorchFunctionMode stays on), so
the tests that use it run in their own pytest process.
"""
import torch
from torch.utils._pytree import tree_flatten, tree_map

NAME = "fakegpu"
_installed = False
# ops CUDA accepts with CPU tensors among their inputs
MIXED_OK = {"copy_", "_copy_from", "_to_copy", "index", "index_put_", "index_put", "_index_put_impl_", "lift_fresh",
            "_has_compatible_shallow_copy_type", "set_", "is_pinned", "_pin_memory"}


class DeviceTensor(torch.Tensor):
    """A tensor on "fakegpu": its data is `raw`, a CPU tensor of the same shape and dtype."""

    @staticmethod
    def __new__(cls, raw):
        t = torch.Tensor._make_wrapper_subclass(cls, raw.shape, strides=raw.stride(), dtype=raw.dtype,
                                                device=torch.device(NAME, 0), storage_offset=raw.storage_offset(),
                                                requires_grad=raw.requires_grad, layout=raw.layout)
        t.raw = raw
        return t

    def tolist(self):  # reads the data directly, past the dispatcher (as on CUDA, it works)
        return self.raw.tolist()

    # Python lists as indices become index tensors through the same path as torch.tensor(device=...), which trips
    # an assert (see TensorMode): make them CPU index tensors first, which CUDA accepts too
    def __getitem__(self, index):
        return super().__getitem__(_list_indices(index))

    def __setitem__(self, index, value):
        return super().__setitem__(_list_indices(index), value)

    def untyped_storage(self):  # a wrapper has none of its own; savers (safetensors, peft) ask for the data's
        return self.raw.untyped_storage()

    def __repr__(self, *, tensor_contents=None):
        return f"DeviceTensor({self.raw!r}, device='{NAME}:0')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run(func, args, kwargs or {})


_Generator = torch.Generator


class Generator(_Generator):
    """torch.Generator, once installed: Generator(NAME) is a CPU generator (PyTorch's Python backends cannot make
    generators of their own)."""

    def __new__(cls, device="cpu"):
        return _Generator.__new__(cls, "cpu" if _on_device(device) else device)

    def __init__(self, device="cpu"):
        pass


def _on_device(d):
    return d is not None and torch.device(d).type == NAME


def _check(func, flat):
    dev = [t for t in flat if isinstance(t, DeviceTensor)]
    base = func._schema.name.split("::")[-1]
    if base.startswith(("index", "_index")) and dev and not isinstance(flat[0], DeviceTensor):
        raise RuntimeError(f"indices should be either on cpu or on the same device as the indexed tensor (cpu) "
                           f"({func})")
    if base in MIXED_OK:
        return
    cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor)
           and t.device.type == "cpu" and t.dim() > 0]
    if dev and cpu:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{NAME}:0 and cpu! ({func})")


def _unwrap(x):
    if isinstance(x, DeviceTensor):
        return x.raw
    if isinstance(x, torch.device) and x.type == NAME:
        return torch.device("cpu")
    return x


def _wrap(x):
    return DeviceTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) else x


def run(func, args, kwargs):
    """Run `func` on the raw CPU tensors and wrap its tensor outputs; in-place ops return their wrapped input."""
    flat, _ = tree_flatten((args, kwargs))
    _check(func, flat)
    target = kwargs.get("device")
    to_cpu = func is torch.ops.aten._to_copy.default and target is not None and not _on_device(target)
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if to_cpu or func is torch.ops.aten._local_scalar_dense.default:
        return out
    # an op whose output is one of its inputs (in-place, out=) returns the input's wrapper, not a new one
    raws = {id(t.raw): t for t in flat if isinstance(t, DeviceTensor)}
    for t in raws.values():  # a wrapper's shape is fixed when it is made: an op that resizes its output must not
        assert t.shape == t.raw.shape, f"{func} resized a {NAME} tensor: give it a functional kernel in install()"
    return tree_map(lambda x: raws[id(x)] if id(x) in raws else _wrap(x), out)


def _fallback(op, *args, **kwargs):
    """PrivateUse1 kernels for ops that reach the backend without a DeviceTensor input: factories
    (torch.zeros(..., device=NAME)) and copies from the CPU into an empty device tensor."""
    return run(op, args, kwargs)


def _list_indices(index):
    parts = index if isinstance(index, tuple) else (index,)
    parts = tuple(_torch_tensor(i) if isinstance(i, list) else i for i in parts)
    return parts if isinstance(index, tuple) else parts[0]


def _fallback_with_op(op):
    return lambda *args, **kwargs: run(op, args, kwargs)


_torch_tensor = torch.tensor


class TensorMode(torch.overrides.TorchFunctionMode):
    """torch.tensor(data, device="fakegpu") made on the CPU and moved: PyTorch's own path for a Python backend trips
    an internal assert (torch 2.13), as it does for data holding device tensors. A mode, not a replaced
    torch.tensor: transformers' weight loading tells functions apart by identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _torch_tensor and (_on_device(kwargs.get("device")) or
                                      any(isinstance(x, DeviceTensor) for x in tree_flatten(args[0])[0])):
            device = kwargs.pop("device", None)
            out = func(tree_map(_unwrap, args[0]), *args[1:], **kwargs)
            return out.to(device) if device is not None else out
        return func(*args, **kwargs)


class Module:
    """torch.fakegpu: what PyTorch asks of a device's module (fork_rng saves and restores its RNG state; its
    sampling uses the CPU generator, so that is the state)."""
    is_initialized = is_available = staticmethod(lambda: True)
    current_device = staticmethod(lambda: 0)
    device_count = staticmethod(lambda: 1)
    _is_in_bad_fork = staticmethod(lambda: False)
    manual_seed_all = staticmethod(lambda seed: None)
    get_rng_state = staticmethod(lambda device=None: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, device=None: None)


def install():
    """Register the device once per process."""
    global _installed, _lib, _aten
    if _installed:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend
    _setup_privateuseone_for_python_backend(NAME, backend_module=Module())
    _lib = torch.library.Library("_", "IMPL")
    _lib.fallback(_fallback, "PrivateUse1")
    _aten = torch.library.Library("aten", "IMPL")
    for name in ("arange", "arange.start", "arange.start_step"):  # else: an empty tensor, then arange(out=) resizes it
        _aten.impl(name, _fallback_with_op(getattr(torch.ops.aten.arange, name.partition(".")[2] or "default")),
                  "PrivateUse1")
    torch.Generator = Generator  # this process only: the tests that use the device run in their own
    TensorMode().__enter__()  # for the rest of the process
    _installed = True
