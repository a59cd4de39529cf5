"""bk.nn.functional.kd_loss, bk.nn.KDLoss and bk.nn.functional.fused_linear_kd_loss against the
pure-torch definition (bigkernels.reference.distill.kd_loss, differentiated by autograd): value and
gradient for (N, V) and (B, T, V) logits, every reduction, temperature, ignore_index, labels +
alpha, 16-bit dtypes, a teacher that requires grad, grad_output != 1, chunk boundaries of the
fused linear loss, a Hugging Face GPT-2 student and teacher, and the errors a caller can act on."""
from __future__ import annotations

import pytest
import torch

import bigkernels as bk
from bigkernels.reference import distill as ref
from conftest import assert_close, devices

F = bk.nn.functional


def _logits(shape, dtype, device, spread=3.0):
    return (torch.randn(*shape, device=device) * spread).to(dtype)


def _labels(lead, v, device, ignore=-100, frac=0.25):
    lab = torch.randint(0, v, lead, device=device)
    if ignore is not None and lab.numel() > 1:  # some rows ignored, the last one counted
        lab[torch.rand(lead, device=device) < frac] = ignore
        lab.view(-1)[0] = ignore
        lab.view(-1)[-1] = 0
    return lab


def _run(fn, s, t, teacher_grad, grad_out_seed=0, **kw):
    """loss and the gradients of (loss * g).sum() for a fixed random g, w.r.t. student (and teacher)."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = fn(s, t, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(loss.device, loss.dtype)
    grads = torch.autograd.grad((loss * g).sum(), (s, t) if teacher_grad else (s,))
    return loss.detach(), grads


def _compare(s, t, teacher_grad=True, what="", **kw):
    """Error vs the definition in float64 at most 2x the error of the definition run in the inputs'
    dtype, plus 1e-5 (fp32) or one 16-bit ulp, relative to the largest entry."""
    got_loss, got_grads = _run(F.kd_loss, s, t, teacher_grad, **kw)
    assert got_loss.dtype == s.dtype
    want_loss, want_grads = _run(ref.kd_loss, s.double(), t.double(), teacher_grad, **kw)
    low_loss, low_grads = _run(ref.kd_loss, s, t, teacher_grad, **kw)
    eps = 1e-5 if s.dtype in (torch.float32, torch.float64) else torch.finfo(s.dtype).eps
    for g, w, lo, name in zip((got_loss, *got_grads), (want_loss, *want_grads), (low_loss, *low_grads),
                              ("loss", "d/dstudent", "d/dteacher")):
        assert g.shape == w.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        own = (lo.double() - w).abs().max().item() if w.numel() else 0.0
        err = (g.double() - w).abs().max().item() if w.numel() else 0.0
        bound = 2 * own + eps * (w.abs().max().item() if w.numel() else 0.0) + 1e-12
        assert err <= bound, f"{what} {name}: error {err:.3g} > {bound:.3g} (definition in {s.dtype}: {own:.3g})"


CASES = [
    dict(),
    dict(temperature=2.0),
    dict(temperature=4.0, reduction="sum"),
    dict(reduction="none", temperature=0.5),
    dict(labels=True, ignore_index=-100),
    dict(labels=True, ignore_index=-100, alpha=0.5, temperature=2.0),
    dict(labels=True, alpha=1.0),
    dict(labels=True, ignore_index=-100, alpha=0.25, reduction="none"),
    dict(labels=True, ignore_index=3, alpha=0.1, reduction="sum", temperature=1.5),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(7, 50), (2, 5, 123), (1, 1, 1029), (3, 4099)], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "-".join(f"{k}={v}" for k, v in CASES[i].items())
                         or "default")
def test_kd_loss_matches_definition(device, shape, case):
    kw = dict(CASES[case])
    s, t = _logits(shape, torch.float32, device), _logits(shape, torch.float32, device)
    if kw.pop("labels", False):
        kw["labels"] = _labels(shape[:-1], shape[-1], device, ignore=kw.get("ignore_index"))
    _compare(s, t, teacher_grad=case % 2 == 1, what=f"{shape} {CASES[case]}", **kw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [0, 5, 7])
def test_kd_loss_16bit(device, dtype, case):
    kw = dict(CASES[case])
    shape = (3, 6, 517)
    s, t = _logits(shape, dtype, device), _logits(shape, dtype, device)
    if kw.pop("labels", False):
        kw["labels"] = _labels(shape[:-1], shape[-1], device, ignore=kw.get("ignore_index"))
    _compare(s, t, teacher_grad=True, what=f"{dtype} {CASES[case]}", **kw)


@pytest.mark.parametrize("device", devices())
def test_batchmean_counts_rows_not_batch(device):
    """(B, T, V): batchmean divides by the counted rows (B·T minus ignored), unlike F.kl_div's B."""
    s, t = _logits((2, 3, 11), torch.float32, device), _logits((2, 3, 11), torch.float32, device)
    rows = F.kd_loss(s, t, reduction="none")
    assert rows.shape == (2, 3)
    assert_close(F.kd_loss(s, t), rows.sum() / 6, rtol=1e-6, atol=0, what="batchmean")
    assert_close(F.kd_loss(s, t, reduction="sum"), rows.sum(), rtol=1e-6, atol=0, what="sum")
    kl_div = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                        reduction="batchmean")
    assert_close(kl_div, rows.sum() / 2, rtol=1e-5, atol=0, what="F.kl_div divides by B")
    labels = torch.tensor([[1, -100, 2], [-100, -100, 0]], device=device)
    got = F.kd_loss(s, t, labels=labels, ignore_index=-100)
    assert_close(got, (rows[0, 0] + rows[0, 2] + rows[1, 2]) / 3, rtol=1e-6, atol=0, what="ignored rows")


@pytest.mark.parametrize("device", devices())
def test_all_rows_ignored(device):
    """Nothing counts: batchmean is 0/0 = NaN (as F.cross_entropy's mean), sum is 0, no gradient."""
    s = _logits((4, 9), torch.float32, device).requires_grad_()
    t = _logits((4, 9), torch.float32, device)
    labels = torch.full((4,), -1, device=device)
    loss = F.kd_loss(s, t, labels=labels, ignore_index=-1, alpha=0.5)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert F.kd_loss(s, t, labels=labels, ignore_index=-1, reduction="sum").item() == 0.0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_backward_twice_with_retained_graph(device, scale):
    """The gradient computed in the forward is handed out, not modified: a second backward through
    the retained graph accumulates the same gradient again (also when it is returned unscaled)."""
    s = _logits((4, 57), torch.float32, device).requires_grad_()
    t = _logits((4, 57), torch.float32, device).requires_grad_()
    loss = F.kd_loss(s, t, temperature=2.0) * scale
    loss.backward(retain_graph=True)
    first_s, first_t = s.grad.clone(), t.grad.clone()
    loss.backward()
    assert_close(s.grad, 2 * first_s, rtol=1e-6, atol=0, what="student grad after two backwards")
    assert_close(t.grad, 2 * first_t, rtol=1e-6, atol=0, what="teacher grad after two backwards")


@pytest.mark.parametrize("device", devices())
def test_no_rows(device):
    """(0, V) and (2, 0, V) logits: batchmean 0/0 = NaN, sum 0, none an empty tensor; empty gradients."""
    for shape in ((0, 13), (2, 0, 13)):
        s = _logits(shape, torch.float32, device).requires_grad_()
        t = _logits(shape, torch.float32, device)
        assert torch.isnan(F.kd_loss(s, t))
        assert F.kd_loss(s, t, reduction="sum").item() == 0.0
        none = F.kd_loss(s, t, reduction="none")
        assert none.shape == shape[:-1]
        (g,) = torch.autograd.grad(F.kd_loss(s, t, reduction="sum"), s)
        assert g.shape == shape


@pytest.mark.parametrize("device", devices())
def test_module_and_no_grad(device):
    s, t = _logits((5, 33), torch.float32, device), _logits((5, 33), torch.float32, device)
    labels = _labels((5,), 33, device)
    mod = bk.nn.KDLoss(temperature=2.0, ignore_index=-100, alpha=0.3)
    assert "temperature=2.0" in repr(mod) and "alpha=0.3" in repr(mod)
    want = F.kd_loss(s, t, temperature=2.0, ignore_index=-100, alpha=0.3, labels=labels)
    assert torch.equal(mod(s, t, labels), want)
    with torch.no_grad():  # no gradient is computed (nothing requires it)
        s.requires_grad_()
        assert torch.equal(mod(s, t, labels), want)


@pytest.mark.parametrize("device", devices())
def test_noncontiguous_logits(device):
    wide = _logits((6, 200), torch.float32, device)
    s, t = wide[:, ::2], wide.flip(0)[:, 1::2]
    _compare(s, t, teacher_grad=True, what="non-contiguous", temperature=2.0)


@pytest.mark.parametrize("device", devices())
def test_float64_runs_the_reference(device):
    s, t = _logits((3, 20), torch.float64, device), _logits((3, 20), torch.float64, device)
    _compare(s, t, teacher_grad=True, what="float64", temperature=3.0)


def test_bad_arguments_are_rejected():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    cases = [
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(alpha=1.5, labels=labels), ValueError, r"alpha must be a number in \[0, 1\], got 1.5"),
        (dict(alpha=0.5), ValueError, "alpha=0.5 mixes in cross-entropy on labels, but labels is None"),
        (dict(ignore_index=-100), ValueError, "ignore_index=-100 selects rows by their label, but labels is None"),
        (dict(reduction="mean"), ValueError, "reduction='mean' is not supported"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(labels=labels.float()), TypeError, "labels must be an integer tensor"),
        (dict(labels=labels[:3]), ValueError, r"labels must have the logits' leading shape \(4,\), got \(3,\)"),
        (dict(labels=labels + 10, alpha=0.1), ValueError, r"labels must be in \[0, 10\)"),
        (dict(ignore_index=1.5, labels=labels), TypeError, "ignore_index must be an int or None"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            F.kd_loss(s, t, **kw)
    with pytest.raises(ValueError, match=r"teacher_logits \(4, 9\) must have the shape of student_logits \(4, 10\)"):
        F.kd_loss(s, t[:, :9])
    with pytest.raises(TypeError, match="student_logits must be float32"):
        F.kd_loss(s.long(), t)
    with pytest.raises(ValueError, match="alpha"):
        bk.nn.KDLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="reduction='mean'"):
        bk.nn.KDLoss(reduction="mean")
    # an out-of-range label that ignore_index covers is fine
    ok = labels.clone()
    ok[0] = -5
    F.kd_loss(s, t, labels=ok, ignore_index=-5, alpha=0.5)


# ----- fused_linear_kd_loss ---------------------------------------------------------------------
def _fused_inputs(n, h, ht, v, dtype, device, lead=None):
    shape = (n,) if lead is None else lead
    hs = torch.randn(*shape, h, device=device).to(dtype)
    hts = torch.randn(*shape, ht, device=device).to(dtype)
    ws = (torch.randn(v, h, device=device) / h ** 0.5).to(dtype)
    wt = (torch.randn(v, ht, device=device) * 2 / ht ** 0.5).to(dtype)
    return hs, ws, hts, wt


def _fused_run(fn, args, teacher_grad, **kw):
    args = [a.detach().clone().requires_grad_(i < 2 or teacher_grad) for i, a in enumerate(args)]
    loss = fn(*args, **kw)
    grads = torch.autograd.grad(loss * 1.7, [a for a in args if a.requires_grad])
    return loss.detach(), grads


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n,chunk", [(37, 8), (37, 37), (37, 100), (1, None), (64, 1), (130, None)])
@pytest.mark.parametrize("opts", [dict(), dict(temperature=2.0, ignore_index=-100, alpha=0.5, labels=True),
                                  dict(reduction="sum", labels=True, ignore_index=-100)], ids=["plain", "ce", "sum"])
def test_fused_linear_matches_definition(device, n, chunk, opts):
    kw = dict(opts)
    v = 203
    args = _fused_inputs(n, 16, 24, v, torch.float32, device)
    if kw.pop("labels", False):
        kw["labels"] = _labels((n,), v, device, ignore=kw.get("ignore_index"))
    teacher_grad = chunk == 8
    got_loss, got = _fused_run(F.fused_linear_kd_loss, args, teacher_grad, chunk_size=chunk, **kw)
    want_loss, want = _fused_run(ref.fused_linear_kd_loss, [a.double() for a in args], teacher_grad, **kw)
    assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-7, what="fused loss")
    for g, w, name in zip(got, want, ("hs", "ws", "ht", "wt")):
        assert g.dtype == torch.float32
        assert_close(g, w, rtol=1e-4, atol=2e-5 * w.abs().max().item(), what=f"fused d/d{name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_linear_16bit_and_3d(device, dtype):
    v = 150
    args = _fused_inputs(None, 32, 48, v, dtype, device, lead=(3, 11))
    labels = _labels((3, 11), v, device)
    kw = dict(temperature=2.0, labels=labels, ignore_index=-100, alpha=0.3)
    got_loss, got = _fused_run(F.fused_linear_kd_loss, args, True, chunk_size=7, **kw)
    want_loss, want = _fused_run(ref.fused_linear_kd_loss, [a.double() for a in args], True, **kw)
    low_loss, low = _fused_run(ref.fused_linear_kd_loss, args, True, **kw)
    eps = torch.finfo(dtype).eps
    for name, g, w, lo in zip(("loss", "hs", "ws", "ht", "wt"), (got_loss, *got), (want_loss, *want), (low_loss, *low)):
        assert g.dtype == dtype and g.shape == w.shape
        own = (lo.double() - w).abs().max().item()
        err = (g.double() - w).abs().max().item()
        assert err <= 2 * own + eps * w.abs().max().item(), f"{dtype} {name}: {err:.3g} vs definition {own:.3g}"


def test_fused_linear_bad_arguments():
    hs, ws, ht, wt = _fused_inputs(5, 8, 12, 30, torch.float32, "cpu")
    with pytest.raises(ValueError, match="reduction must be one of"):
        F.fused_linear_kd_loss(hs, ws, ht, wt, reduction="none")
    with pytest.raises(ValueError, match=r"student_hidden \(5, 8\) must end in 9 features"):
        F.fused_linear_kd_loss(hs, torch.randn(30, 9), ht, wt)
    with pytest.raises(ValueError, match="must share a non-empty vocabulary"):
        F.fused_linear_kd_loss(hs, ws, ht, wt[:29])
    with pytest.raises(ValueError, match="same tokens"):
        F.fused_linear_kd_loss(hs, ws, ht[:4], wt)
    with pytest.raises(TypeError, match="student_hidden is torch.bfloat16 but student_head_weight is torch.float32"):
        F.fused_linear_kd_loss(hs.bfloat16(), ws, ht, wt)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        F.fused_linear_kd_loss(hs, ws, ht, wt, chunk_size=0)


def test_default_chunk_rows():
    from bigkernels.ops.distill import default_chunk_rows

    assert default_chunk_rows(16384, 4096, 128256) == 512  # N / ceil(V / H) (Liger's rule)
    assert default_chunk_rows(65536, 4096, 32000) == 8192
    assert default_chunk_rows(4096, 256, 32000) == 256  # at least ~8M logits: 2^23 / 32000 -> 256 rows
    assert default_chunk_rows(4096, 1024, 128256) == 64
    assert default_chunk_rows(10, 64, 50000) == 10  # never more than N


def test_hf_gpt2_student_and_teacher():
    """A tiny Hugging Face GPT-2 teacher and a narrower student: fused_linear_kd_loss on the final
    hidden states and lm_head weights equals kd_loss on the models' logits, and both equal the
    definition; a few training steps with either loss give the same student."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_positions=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    teacher = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, **cfg)).eval()
    students = [transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, **cfg)) for _ in range(2)]
    students[1].load_state_dict(students[0].state_dict())
    x = torch.randint(0, 97, (3, 16))
    labels = torch.cat([x[:, 1:], torch.full((3, 1), -100)], dim=1)
    opts = [torch.optim.SGD(s.parameters(), lr=0.5) for s in students]
    for _ in range(3):
        with torch.no_grad():
            t_out = teacher(x, output_hidden_states=True)
        out0 = students[0](x)
        loss0 = F.kd_loss(out0.logits, t_out.logits, temperature=2.0, labels=labels, ignore_index=-100, alpha=0.5)
        want = ref.kd_loss(out0.logits.double(), t_out.logits.double(), labels, 2.0, -100, 0.5)
        assert_close(loss0, want, rtol=1e-5, atol=0, what="kd_loss on GPT-2 logits")
        h1 = students[1].transformer(x).last_hidden_state
        loss1 = F.fused_linear_kd_loss(h1, students[1].lm_head.weight, t_out.hidden_states[-1],
                                       teacher.lm_head.weight, temperature=2.0, labels=labels, ignore_index=-100,
                                       alpha=0.5, chunk_size=5)
        assert_close(loss1, loss0, rtol=1e-5, atol=0, what="fused vs logits")
        for opt, loss in zip(opts, (loss0, loss1)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p0, p1 in zip(students[0].parameters(), students[1].parameters()):
        assert_close(p1, p0, rtol=1e-4, atol=1e-6, what="student after 3 steps")
