"""The distillation kernel op (torch.ops.bigkernels.kd_loss_fwd) against
bigkernels.reference.distill on every device's compiled kernel: dtypes (fp32 / bf16 / fp16 and a
mixed pair) x shapes (V not a multiple of any vector width or flush block, N = 0 and 1, 4,099-wide
rows, non-contiguous rows and columns) x options (temperature, labels + ignore_index + alpha,
teacher gradient), every CPU instruction set; extreme logits (-inf, huge spreads), opcheck of the
three ops, torch.compile(fullgraph=True), and rejected input."""
from __future__ import annotations

import pytest
import torch

from bigkernels.reference import distill as ref
from conftest import assert_close, devices, require_kernel

ops = torch.ops.bigkernels
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.float32, torch.bfloat16)]
DTYPE_IDS = ["f32", "bf16", "f16", "f32-t-bf16"]
# (N, V): V = 1; odd V below one AVX2 / AVX-512 vector; V past the 64-vector flush block with a tail
SHAPES = [(0, 7), (1, 1), (1, 37), (5, 123), (3, 1029), (2, 4099)]
# (temperature, alpha, labels?, ignore_index, grad_teacher)
OPTIONS = [(1.0, 0.0, False, None, False), (2.5, 0.0, True, -100, True), (1.0, 0.4, True, -100, False),
           (3.0, 0.7, True, 2, True)]
OPTION_IDS = ["plain", "T2.5-ignore-gradt", "ce-T1", "ce-T3-gradt"]


def _logits(n, v, dtype, device, spread=4.0):
    x = torch.randn(n, v, device=device) * spread * torch.rand(n, 1, device=device).add_(0.2)
    return x.to(dtype)


def _labels(n, v, ignore, device):
    lab = torch.randint(0, v, (n,), device=device)
    if ignore is not None and n > 1:
        lab[1] = ignore
    return lab


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_reference(got, s, t, labels, scale, T, alpha, ignore, gt_flag, what):
    """fp32: <= 1e-5 relative; 16-bit: the error vs the fp32 definition at most 2x (+ one final
    rounding) the error of the pure-torch definition run in the 16-bit dtype."""
    rows, gs, gt = got
    want = ref.kd_loss_fwd(s.float(), t.float(), labels, scale, T, alpha, ignore, True, gt_flag)
    assert rows.dtype == torch.float32 and rows.shape == (s.shape[0],)
    assert gs.dtype == s.dtype and gs.shape == s.shape, what
    assert (gt.shape == t.shape and gt.dtype == t.dtype) if gt_flag else gt.numel() == 0, what
    for name, g, w, dtype in (("loss", rows, want[0], torch.float32), ("grad_student", gs, want[1], s.dtype),
                              ("grad_teacher", gt, want[2], t.dtype)):
        if name == "grad_teacher" and not gt_flag:
            continue
        assert not torch.isnan(g).any(), f"{what}: NaN in {name}"
        mag = w.abs().max().item() if w.numel() else 0.0
        if dtype == torch.float32 and s.dtype == t.dtype == torch.float32:
            assert_close(g, w, rtol=1e-5, atol=1e-5 * mag + 1e-7, what=f"{what} {name}")
        else:
            own = _own_low_precision_error(s, t, labels, scale, T, alpha, ignore, name)
            eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
            bound = 2 * own + eps * mag + 1e-7
            err = _err(g, w)
            assert err <= bound, f"{what} {name}: error {err:.3g} > bound {bound:.3g} (definition in 16-bit: {own:.3g})"


def _own_low_precision_error(s, t, labels, scale, T, alpha, ignore, name):
    """How far the pure-torch definition lands from its fp32 self when run in the inputs' dtypes."""
    low = s.dtype if s.dtype != torch.float32 else t.dtype
    exact = _definition(s.double(), t.double(), labels, scale, T, alpha, ignore)
    approx = _definition(s.to(low), t.to(low), labels, scale, T, alpha, ignore)
    i = {"loss": 0, "grad_student": 1, "grad_teacher": 2}[name]
    return _err(approx[i], exact[i])


def _definition(s, t, labels, scale, T, alpha, ignore):
    """Per-row losses and scaled gradients of the autograd definition (reference.kd_loss)."""
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    rows = ref.kd_loss(s, t, labels, T, ignore, alpha, reduction="none")
    gs, gt = torch.autograd.grad(rows.sum(), (s, t))
    sc = scale.to(s.dtype)
    return rows.detach(), gs * sc, gt * sc


def _case(device, dtypes, shape, options, cpu_isa):
    require_kernel("kd_loss_fwd", device)
    (n, v), (sdt, tdt) = shape, dtypes
    T, alpha, use_labels, ignore, gt_flag = options
    s, t = _logits(n, v, sdt, device), _logits(n, v, tdt, device)
    labels = _labels(n, v, ignore, device) if use_labels else None
    scale = torch.tensor(1.0 / max(1, n), device=device)
    got = ops.kd_loss_fwd(s, t, labels, scale, T, alpha, ignore if use_labels else None, True, gt_flag)
    check_against_reference(got, s, t, labels, scale, T, alpha, ignore if use_labels else None, gt_flag,
                            f"{device} {sdt}/{tdt} {shape} {options} isa={cpu_isa}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_kd_loss_fwd(device, dtypes, shape, options):
    _case(device, dtypes, shape, options, "native")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtypes", DTYPES[:2], ids=DTYPE_IDS[:2])
@pytest.mark.parametrize("shape", [(5, 123), (2, 4099)], ids=str)
@pytest.mark.parametrize("options", OPTIONS[::3], ids=OPTION_IDS[::3])
def test_kd_loss_fwd_every_isa(device, dtypes, shape, options, cpu_isa):
    """The same checks with each narrower instruction set forced (vector body, tails, exp)."""
    _case(device, dtypes, shape, options, cpu_isa)


@pytest.mark.parametrize("device", devices())
def test_loss_only_and_strided_inputs(device, cpu_isa):
    """No gradient asked: empty gradient outputs, same losses. Rows with a stride (every other
    row of a wider tensor) and columns with a stride (copied) give the same results."""
    require_kernel("kd_loss_fwd", device)
    n, v = 7, 301
    wide_s, wide_t = _logits(2 * n, 2 * v, torch.float32, device), _logits(2 * n, 2 * v, torch.float32, device)
    scale = torch.tensor(0.5, device=device)
    for s, t in ((wide_s[::2, :v], wide_t[::2, :v]), (wide_s[:n, ::2], wide_t[:n, ::2])):
        rows, gs, gt = ops.kd_loss_fwd(s, t, None, scale, 1.5, 0.0, None, False, False)
        assert gs.numel() == 0 and gt.numel() == 0
        want = ref.kd_loss_fwd(s, t, None, scale, 1.5, 0.0, None, False, False)[0]
        assert_close(rows, want, rtol=1e-5, atol=1e-6, what="loss-only rows")
        got = ops.kd_loss_fwd(s, t, None, scale, 1.5, 0.0, None, True, True)
        check_against_reference(got, s, t, None, scale, 1.5, 0.0, None, True, f"strided {tuple(s.stride())}")


@pytest.mark.parametrize("device", devices())
def test_extreme_logits(device, cpu_isa):
    """-inf logits (masked vocabulary entries) count as probability 0 (p·log p = 0), a spread of
    ±80 stays finite, an ignored row full of NaN stays out of the loss and gets zero gradient."""
    require_kernel("kd_loss_fwd", device)
    v = 77
    s, t = _logits(4, v, torch.float32, device), _logits(4, v, torch.float32, device)
    s[0, 5:40] = float("-inf")
    t[0, 5:40] = float("-inf")  # masked in both: no contribution
    s[1] = torch.linspace(-80, 80, v, device=device)
    t[2] = torch.linspace(80, -80, v, device=device)
    s[3] = float("nan")
    labels = torch.tensor([1, 2, 3, -1], device=device)
    scale = torch.tensor(0.25, device=device)
    rows, gs, gt = ops.kd_loss_fwd(s, t, labels, scale, 2.0, 0.3, -1, True, True)
    assert torch.isfinite(rows).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert rows[3] == 0 and (gs[3] == 0).all() and (gt[3] == 0).all()
    # row 0 equals the same row without the masked entries
    keep = torch.ones(v, dtype=torch.bool, device=device)
    keep[5:40] = False
    r0 = ops.kd_loss_fwd(s[:1, keep], t[:1, keep], labels[:1], scale, 2.0, 0.3, -1, True, True)
    assert_close(rows[:1], r0[0], rtol=1e-5, atol=1e-6, what="masked row loss")
    assert_close(gs[:1, keep], r0[1], rtol=1e-5, atol=1e-8, what="masked row grad")
    assert (gs[0, ~keep] == 0).all() and (gt[0, ~keep] == 0).all()
    want = ref.kd_loss_fwd(s[1:3], t[1:3], labels[1:3], scale, 2.0, 0.3, -1, True, True)
    assert_close(rows[1:3], want[0], rtol=1e-5, atol=1e-5, what="spread rows")
    assert_close(gs[1:3], want[1], rtol=1e-5, atol=1e-7, what="spread grads")


def _small_args(device):
    s, t = _logits(6, 45, torch.float32, device), _logits(6, 45, torch.float32, device)
    labels = _labels(6, 45, -100, device)
    return s, t, labels


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("op", ["kd_loss_fwd", "kd_loss", "fused_linear_kd_loss"])
def test_opcheck(device, op):
    require_kernel("kd_loss_fwd", device)
    s, t, labels = _small_args(device)
    if op == "kd_loss_fwd":
        scale = torch.tensor(1 / 5, device=device)
        torch.library.opcheck(ops.kd_loss_fwd.default, (s, t, labels, scale, 2.0, 0.5, -100, True, True))
        torch.library.opcheck(ops.kd_loss_fwd.default, (s[:0], t[:0], None, scale, 1.0, 0.0, None, True, False))
    elif op == "kd_loss":
        sg, tg = s.clone().requires_grad_(), t.clone().requires_grad_()
        torch.library.opcheck(ops.kd_loss.default, (sg, tg, labels, 2.0, 0.5, -100, "batchmean", True, True))
        torch.library.opcheck(ops.kd_loss.default, (sg, t, labels, 1.0, 0.0, -100, "none", True, False))
    else:
        hs = torch.randn(6, 8, device=device, requires_grad=True)
        ws = torch.randn(45, 8, device=device, requires_grad=True)
        ht, wt = torch.randn(6, 12, device=device), torch.randn(45, 12, device=device)
        torch.library.opcheck(ops.fused_linear_kd_loss.default,
                              (hs, ws, ht, wt, labels, 2.0, 0.25, -100, "batchmean", 4, True, True, False, False))


@pytest.mark.parametrize("device", devices())
def test_compiles_fullgraph(device):
    """kd_loss and fused_linear_kd_loss inside a compiled training step: no graph break, same
    loss and gradients as eager."""
    require_kernel("kd_loss_fwd", device)
    import bigkernels as bk

    torch._dynamo.reset()
    s0, t, labels = _small_args(device)
    hs0, ws0 = torch.randn(6, 8, device=device), torch.randn(45, 8, device=device)
    ht, wt = torch.randn(6, 12, device=device), torch.randn(45, 12, device=device)

    def losses(s, hs, ws):
        a = bk.nn.functional.kd_loss(s.view(2, 3, 45), t.view(2, 3, 45), temperature=2.0, labels=labels.view(2, 3),
                                     ignore_index=-100, alpha=0.5)
        b = bk.nn.functional.fused_linear_kd_loss(hs, ws, ht, wt, temperature=2.0, labels=labels, ignore_index=-100,
                                                  chunk_size=4)
        return a, b

    results = []
    for fn in (losses, torch.compile(losses, fullgraph=True, backend="aot_eager")):
        s, hs, ws = (x.clone().requires_grad_() for x in (s0, hs0, ws0))
        a, b = fn(s, hs, ws)
        (a + 2 * b).backward()  # through the compiled backward graph
        results.append((a.detach(), b.detach(), s.grad, hs.grad, ws.grad))
    for got, want, name in zip(results[1], results[0], ("kd", "fused", "s.grad", "hs.grad", "ws.grad")):
        assert_close(got, want, rtol=1e-6, atol=1e-7, what=f"compiled {name}")


@pytest.mark.parametrize("device", devices())
def test_bad_input_is_rejected(device):
    require_kernel("kd_loss_fwd", device)
    s, t, labels = _small_args(device)
    one = torch.tensor(1.0, device=device)
    bad = [
        ((s, t[:, :44], None, one, 1.0, 0.0, None, True, False), "must match"),
        ((s[0], t[0], None, one, 1.0, 0.0, None, True, False), "2-D"),
        ((s.double(), t.double(), None, one, 1.0, 0.0, None, True, False), "float32, bfloat16 or float16"),
        ((s, t, None, one, 0.0, 0.0, None, True, False), "temperature"),
        ((s, t, None, one, 1.0, 1.5, None, True, False), "alpha"),
        ((s, t, None, one, 1.0, 0.5, None, True, False), "needs labels"),
        ((s, t, labels.int(), one, 1.0, 0.0, -100, True, False), "int64"),
        ((s, t, labels[:3], one, 1.0, 0.0, -100, True, False), "labels of shape"),
        ((s, t, labels.clamp(min=0) + 45, one, 1.0, 0.5, -100, True, False), "outside [0, 45)"),
        ((s, t, None, torch.ones(2, device=device), 1.0, 0.0, None, True, False), "one-element grad_scale"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            torch.ops.bigkernels.kd_loss_fwd(*args)


def test_many_rows_many_threads_match():
    """Enough rows for every thread of at::parallel_for to take blocks; equals running row by row."""
    require_kernel("kd_loss_fwd", "cpu")
    s, t = _logits(97, 2000, torch.float32, "cpu"), _logits(97, 2000, torch.float32, "cpu")
    labels = _labels(97, 2000, -100, "cpu")
    scale = torch.tensor(1 / 96)
    rows, gs, _ = ops.kd_loss_fwd(s, t, labels, scale, 2.0, 0.5, -100, True, False)
    for r in (0, 1, 50, 96):
        r1, g1, _ = ops.kd_loss_fwd(s[r:r + 1], t[r:r + 1], labels[r:r + 1], scale, 2.0, 0.5, -100, True, False)
        assert torch.equal(rows[r:r + 1], r1) and torch.equal(gs[r:r + 1], g1)
