"""The one checker of tests/ops/test_<op>.py: an op's front door, with every backend the registry lists for it
(``backends.OPS[op]``), against its reference function, on the op's case table (tests/cases.py).

* backend "reference" is the reference function: output and every gradient equal bit for bit (every dtype);
* every other backend is within the numerics contract (DESIGN.md section 4) of the reference run in fp64 on the
  same rounded inputs: fp32 atol = rtol = 1e-4; fp64 tight; fp16/bf16 at most twice the error of the reference
  itself run in that dtype (the FlashAttention convention, over the whole call: see check_low_precision). A call
  the backend cannot run here is skipped with the registry's reason (``backends.call_reason``);
* a channels_last x gives the values of its contiguous copy, and the output layout that
  ``Support.keeps_channels_last`` says.
"""

from functools import partial

import pytest
import torch

from bcos_kernels import backends

F64 = torch.float64
# fp64 is not in the contract; a backend that computes in fp64 is held to rounding-level agreement.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
LOW_PRECISION_FACTOR = 2
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in backends.FLOAT_DTYPES]


def inputs(case, dtype, compute=None):
    """The case's inputs for a run in ``dtype``: its fp64 tensors rounded to dtype, then in ``compute`` (default:
    dtype), as fresh leaves that require grad (x channels_last if the case says so); the others as they are."""
    out = {}
    for name, t in case.inputs.items():
        if isinstance(t, torch.Tensor) and t.dtype == F64:
            t = t.to(dtype).to(compute or dtype)
            if name == "x" and case.channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            t = t.detach().requires_grad_()
        out[name] = t
    return out


def run(fn, case, tensors, dtype):
    """{name: tensor}: fn's output and the gradient of every differentiable input (zeros where it gets none) for a
    fixed random grad_out (rounded to dtype)."""
    out = fn(**tensors, **case.kwargs)
    leaves = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), gout, materialize_grads=True)
    return {"out": out.detach(), **{f"grad {name}": g for name, g in zip(leaves, grads)}}


def skip_unless_runs(op, backend, x, case):
    reason = backends.call_reason(op, backend, x, **case.facts)
    if reason is not None:
        pytest.skip(reason)


def check_reference_backend(op, front, reference, case, dtype):
    tensors = inputs(case, dtype)
    got = run(partial(front, backend="reference"), case, tensors, dtype)
    want = run(reference, case, tensors, dtype)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), f"{op} {case.id}: {name} differs"


def check_backend(op, backend, front, reference, case, dtype, tolerance=TOLERANCE):
    tensors = inputs(case, dtype)
    skip_unless_runs(op, backend, tensors["x"], case)
    got = run(partial(front, backend=backend), case, tensors, dtype)
    want = run(reference, case, inputs(case, dtype, F64), dtype)
    what = f"{op} {backend} {case.id}"
    for name in want:
        assert got[name].dtype == dtype, f"{what}: {name} has dtype {got[name].dtype}"
    if dtype not in tolerance:
        return check_low_precision(got, want, run(reference, case, tensors, dtype), what, dtype)
    tol = tolerance[dtype]
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, atol=tol, rtol=tol, msg=lambda m: f"{what}: {name}: {m}")


def check_low_precision(got, want, low, what, dtype):
    """fp16/bf16: the backend's error against the fp64 reference at most LOW_PRECISION_FACTOR times the error of the
    reference run in dtype (its results rounded to dtype where it returns wider ones).

    The error of a call is the RMS over its output and all its gradients, each tensor's errors relative to its
    largest fp64 value. Not each tensor's max error, as FlashAttention's tests take on large tensors: on the tiny
    tensors here that is a sample of a few roundings (a bias of 3 elements, a scalar b) that a backend and the
    reference each win by luck by more than 2x. Bugs are caught in fp32/fp64, tensor by tensor."""
    scale = {name: value.abs().max().clamp_min(torch.finfo(dtype).tiny) for name, value in want.items()}

    def relative(results):
        return {name: (results[name].to(dtype).double() - value) / scale[name] for name, value in want.items()}

    def rms(errors):
        return torch.cat([e.flatten() for e in errors.values()]).square().mean().sqrt().item()

    err, ref_err = relative(got), relative(low)
    assert rms(err) <= LOW_PRECISION_FACTOR * rms(ref_err), (
        f"{what}: relative RMS error {rms(err):.3g} against the fp64 reference, more than {LOW_PRECISION_FACTOR}x "
        f"the reference's own in {dtype} ({rms(ref_err):.3g}); per tensor (backend, reference): "
        + ", ".join(f"{name} ({rms({0: err[name]}):.3g}, {rms({0: ref_err[name]}):.3g})" for name in want)
    )


def check_channels_last(op, backend, front, case):
    tensors = inputs(case, torch.float32)
    skip_unless_runs(op, backend, tensors["x"], case)
    out = front(**tensors, **case.kwargs, backend=backend).detach()
    plain = front(**{**tensors, "x": tensors["x"].contiguous()}, **case.kwargs, backend=backend).detach()
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(out, plain, atol=tol, rtol=tol)
    keeps = backends.OPS[op][backend].keeps_channels_last
    if keeps is None:  # the registry promises no layout for this backend (a reference: ATen decides)
        return
    layout = torch.channels_last if keeps else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout), (
        f"{op} {backend}: a channels_last x gives an output with strides {out.stride()} (shape {tuple(out.shape)}),"
        f" but the registry says keeps_channels_last={keeps}"
    )


AUTOCAST_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.bfloat16, torch.float16)]


def check_autocast(op, backend, front, case, dtype, lowered):
    """Under ``torch.autocast("cpu", dtype)`` a call on fp32 inputs is exactly the call without autocast on the
    inputs autocast's policy casts (bcos_kernels/ops/_autocast.py): the ``lowered`` ones in dtype, the others as
    they are; output and every gradient bit for bit, the gradients in the leaves' fp32; with the backward outside
    the autocast region and inside it."""
    tensors = inputs(case, torch.float32)
    cast = {
        name: t.detach().to(dtype).requires_grad_(t.requires_grad) if name in lowered and t is not None else t
        for name, t in tensors.items()
    }
    skip_unless_runs(op, backend, cast["x"], case)

    def seeded(**kwargs):  # the same noise for every call of a sampling op
        torch.manual_seed(0)
        return front(**kwargs, backend=backend)

    def forward_under_autocast(**kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return seeded(**kwargs)

    want = run(seeded, case, cast, dtype)
    with torch.autocast("cpu", dtype=dtype):
        inside = run(seeded, case, tensors, dtype)
    outside = run(forward_under_autocast, case, tensors, dtype)
    for where, got in (("backward outside autocast", outside), ("backward inside autocast", inside)):
        for name, value in want.items():
            leaf = tensors.get(name.removeprefix("grad "))
            expected = value.to(leaf.dtype) if name.startswith("grad ") else value
            assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), (
                f"{op} {backend} {case.id} under autocast({dtype}), {where}: {name} ({got[name].dtype}) is not the "
                f"call on the cast inputs ({expected.dtype})"
            )


def check_deterministic(op, backend, front, case):
    """With ``torch.use_deterministic_algorithms(True)`` and 2 intra-op threads, two calls on the same inputs (a
    sampling op: after the same seed) give the same output and gradients bit for bit."""
    skip_unless_runs(op, backend, inputs(case, torch.float32)["x"], case)

    def seeded(**kwargs):
        torch.manual_seed(0)
        return front(**kwargs, backend=backend)

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (run(seeded, case, inputs(case, torch.float32), torch.float32) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    for name, value in first.items():
        assert torch.equal(second[name], value), f"{op} {backend} {case.id}: {name} differs between two calls"


def op_tests(op, front, reference, cases, tolerance=TOLERANCE, autocast_lowers=()):
    """The test functions of one op, {name: function} (a test module adds them to its globals, so that a check added
    here runs for every op): backend "reference" against
    the reference function, every other backend against the reference (fp32/fp64 within ``tolerance``), the
    channels_last cases' layout against the registry's ``keeps_channels_last``, and every backend under autocast
    (``autocast_lowers``: the inputs it casts to the autocast dtype, see check_autocast), and every backend's
    determinism."""
    params = pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in cases])
    dtypes = pytest.mark.parametrize("dtype", DTYPES)
    fast = pytest.mark.parametrize("backend", [b for b in backends.OPS[op] if b != "reference"])

    @dtypes
    @params
    def test_reference_backend_is_the_reference_function(case, dtype):
        check_reference_backend(op, front, reference, case, dtype)

    @dtypes
    @params
    @fast
    def test_backend_matches_reference(backend, case, dtype):
        check_backend(op, backend, front, reference, case, dtype, tolerance)

    @pytest.mark.parametrize(
        "backend,case",
        [pytest.param(b, c, id=f"{b}-{c.id}") for b in backends.OPS[op] for c in cases if c.channels_last],
    )
    def test_channels_last(backend, case):
        check_channels_last(op, backend, front, case)

    @pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
    @params
    @pytest.mark.parametrize("backend", list(backends.OPS[op]))
    def test_autocast(backend, case, dtype):
        check_autocast(op, backend, front, case, dtype, autocast_lowers)

    @params
    @pytest.mark.parametrize("backend", list(backends.OPS[op]))
    def test_deterministic(backend, case):
        check_deterministic(op, backend, front, case)

    tests = {name: test for name, test in locals().items() if name.startswith("test_")}
    if not any(c.channels_last for c in cases):
        del tests["test_channels_last"]  # no case to run (an empty parametrisation would be a skip)
    return tests
