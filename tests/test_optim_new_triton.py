"""Triton kernels of RMSprop / Lion / Adafactor (bigkernels.triton.optim_more) vs
bigkernels.reference.optim, under the Triton interpreter on CPU tensors (own pytest process with
TRITON_INTERPRET=1) or on a GPU: both launch paths (the one-launch table, traced per tensor),
misaligned views (the table path's per-tensor alignment check), masks, GradScaler, clipping,
found_inf, opcheck and torch.compile."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TRITON_DEVICE, TRITON_FLOAT_DTYPES, skip_module_without_triton_runtime

skip_module_without_triton_runtime()

import bigkernels.ops.optim  # noqa: E402,F401  (defines the main schemas)
from bigkernels.reference import optim as ref  # noqa: E402
from bigkernels.triton import optim as tri  # noqa: E402
from bigkernels.triton import optim_more  # noqa: E402,F401  (registers the ops)

pytestmark = pytest.mark.triton_interpret

DEVICE = TRITON_DEVICE
OPS = torch.ops.bigkernels
SHAPES = [(1,), (3,), (129,), (5, 7), (0,), ()]  # 129 spans several chunks under the interpreter
FACTORED = [(5, 7), (2, 3, 20), (1, 1), (9, 130)]
VECTORS = [(1,), (129,), (0,), ()]


def _rand(shape, dtype, gen, scale=1.0, positive=False):
    t = torch.randn(shape, generator=gen) * scale
    return (t.abs() if positive else t).to(device=DEVICE, dtype=dtype)


def _misaligned(t):
    """A contiguous copy of ``t`` one element past a 16-byte boundary (a view into a flat buffer)."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def rmsprop(gen, dtype, shapes=SHAPES, centered=True, momentum=0.9):
    lists = [[_rand(s, dtype, gen) for s in shapes], [_rand(s, dtype, gen) for s in shapes],
             [_rand(s, dtype, gen, positive=True) + 0.5 for s in shapes],
             [_rand(s, dtype, gen, 0.1) for s in shapes] if centered else [],
             [_rand(s, dtype, gen, 0.1) for s in shapes] if momentum else [],
             [torch.tensor(3.0, device=DEVICE) for _ in shapes]]
    kw = dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=momentum, centered=centered, maximize=True)
    return lists, kw, OPS.fused_rmsprop_triton_, ref.fused_rmsprop_


def lion(gen, dtype, shapes=SHAPES):
    lists = [[_rand(s, dtype, gen) for s in shapes], [_rand(s, dtype, gen) for s in shapes],
             [_rand(s, dtype, gen, 0.1) for s in shapes]]
    lists[1][0].view(-1)[:4] = 0.0  # c = 0 where m is 0 there too: sign(0) = 0
    lists[2][0].view(-1)[:4] = 0.0
    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.5, maximize=False)
    return lists, kw, OPS.fused_lion_triton_, ref.fused_lion_


def adafactor(gen, dtype, factored=True):
    shapes = FACTORED if factored else VECTORS
    lists = [[_rand(s, dtype, gen) for s in shapes], [_rand(s, dtype, gen) for s in shapes],
             [_rand(s[:-1] + (1,), dtype, gen, 0.1, True) for s in shapes] if factored else [],
             [_rand(s[:-2] + (1, s[-1]), dtype, gen, 0.1, True) for s in shapes] if factored else [],
             [] if factored else [_rand(s, dtype, gen, 0.1, True) for s in shapes],
             [torch.tensor(float(i * 7), device=DEVICE) for i in range(len(shapes))]]
    kw = dict(lr=0.05, beta2_decay=-0.8, eps1=1e-3, eps2=1e-3, d=1.0, weight_decay=0.1, maximize=True)
    return lists, kw, OPS.fused_adafactor_triton_, ref.fused_adafactor_


def _compare(got, want, dtype, what):
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    for r, (a, b) in enumerate(zip(got, want)):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{what} list {r}[{i}]: {m}")


def _run(case, steps=2, extra=None, traced=False):
    lists, kw, op, reference = case
    kw = dict(kw, **(extra or {}))
    expected = copy.deepcopy(lists)
    call = (lambda *a: op(*a, masks=kw.get("masks", []), **{k: v for k, v in kw.items() if k != "masks"}))
    if traced:
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True)
    for _ in range(steps):
        call(*lists)
        reference(*expected, **kw)
    return lists, expected


@pytest.mark.parametrize("dtype", TRITON_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", ["rmsprop", "rmsprop-plain", "lion", "adafactor", "adafactor-vector"])
def test_matches_reference(name, dtype):
    gen = torch.Generator().manual_seed(len(name))
    case = {"rmsprop": lambda: rmsprop(gen, dtype), "rmsprop-plain": lambda: rmsprop(gen, dtype, centered=False,
                                                                                    momentum=0.0),
            "lion": lambda: lion(gen, dtype), "adafactor": lambda: adafactor(gen, dtype),
            "adafactor-vector": lambda: adafactor(gen, dtype, factored=False)}[name]()
    got, want = _run(case)
    _compare(got, want, dtype, name)


@pytest.mark.parametrize("name", ["rmsprop", "lion", "adafactor"])
def test_traced_path_matches_reference(name):
    gen = torch.Generator().manual_seed(100 + len(name))
    case = {"rmsprop": rmsprop, "lion": lion, "adafactor": adafactor}[name](gen, torch.float32)
    got, want = _run(case, steps=2, traced=True)
    _compare(got, want, torch.float32, f"traced {name}")


@pytest.mark.parametrize("name", ["rmsprop", "lion"])
def test_table_path_with_misaligned_views(name):
    """Views one element off a 16-byte boundary (flat-buffer state) take the unaligned loop."""
    gen = torch.Generator().manual_seed(200)
    lists, kw, op, reference = (rmsprop if name == "rmsprop" else lion)(gen, torch.float32, shapes=[(129,), (70,)])
    lists[0][0], lists[2][1] = _misaligned(lists[0][0]), _misaligned(lists[2][1])
    tri.clear_table_cache()
    got, want = _run((lists, kw, op, reference))
    _compare(got, want, torch.float32, f"misaligned {name}")
    assert len(tri._TABLE_CACHE) > 0  # eager calls took the one-launch table path


@pytest.mark.parametrize("name", ["rmsprop", "lion", "adafactor"])
def test_masks_scale_and_clip(name):
    gen = torch.Generator().manual_seed(300 + len(name))
    lists, kw, op, reference = {"rmsprop": rmsprop, "lion": lion, "adafactor": adafactor}[name](gen, torch.float32)
    masks = [(torch.rand(p.shape, generator=gen) > 0.4).to(DEVICE) for p in lists[0]]
    extra = dict(masks=masks, grad_scale=torch.tensor(4.0, device=DEVICE),
                 grad_norm=torch.tensor(50.0, device=DEVICE), max_grad_norm=1.0)
    got, want = _run((lists, kw, op, reference), extra=extra)
    _compare(got, want, torch.float32, f"{name} masks+scale+clip")
    for p, m in zip(got[0], masks):
        assert (p[~m] == 0).all()


@pytest.mark.parametrize("name", ["rmsprop", "lion", "adafactor"])
def test_found_inf_changes_nothing(name):
    gen = torch.Generator().manual_seed(400)
    lists, kw, op, reference = {"rmsprop": rmsprop, "lion": lion, "adafactor": adafactor}[name](gen, torch.float32)
    before = copy.deepcopy(lists)
    op(*lists, masks=[], found_inf=torch.ones(1, device=DEVICE), **kw)
    for a, b in zip(lists, before):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["rmsprop", "lion", "adafactor"])
def test_opcheck(name):
    gen = torch.Generator().manual_seed(500)
    maker = {"rmsprop": lambda: rmsprop(gen, torch.float32, shapes=[(3,), (5,)]),
             "lion": lambda: lion(gen, torch.float32, shapes=[(3,), (5,)]),
             "adafactor": lambda: adafactor(gen, torch.float32)}[name]
    lists, kw, op, _ = maker()
    torch.library.opcheck(op.default, tuple(lists), dict(kw, masks=[], grad_scale=torch.tensor(2.0, device=DEVICE)))


def test_rejects_bad_input_without_changes():
    gen = torch.Generator().manual_seed(600)
    lists, kw, op, _ = adafactor(gen, torch.float32)
    before = copy.deepcopy(lists)
    with pytest.raises(ValueError, match="row_vars"):
        op(lists[0], lists[1], lists[3], lists[3], [], lists[5], masks=[], **kw)
    rl, rkw, rop, _ = rmsprop(gen, torch.float32)
    with pytest.raises(ValueError, match="grads"):
        rop(rl[0], rl[1][:-1], *rl[2:], masks=[], **rkw)
    for a, b in zip(lists, before):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
