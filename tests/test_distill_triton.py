"""The Triton distillation kernel (kd_loss_fwd_triton) vs bigkernels.reference.distill, under the
Triton interpreter on CPU tensors (own pytest process, TRITON_INTERPRET=1) or on a CUDA GPU: dtypes,
rows spanning several BLOCK_V chunks with a partial last one (the interpreter's BLOCK_V is 32),
every option, -inf / ignored NaN rows, the public losses routed through it, opcheck and
torch.compile(fullgraph=True)."""
from __future__ import annotations

import pytest
import torch

from conftest import DT_IDS, TRITON_DEVICE, TRITON_FLOAT_DTYPES, assert_close, skip_module_without_triton_runtime

skip_module_without_triton_runtime()

import bigkernels as bk  # noqa: E402
from bigkernels.ops import _registry  # noqa: E402
from bigkernels.reference import distill as ref  # noqa: E402
from bigkernels.triton import distill as tri  # noqa: E402,F401  (registers kd_loss_fwd_triton)
from test_distill_ops import OPTION_IDS, OPTIONS, _labels, _logits, check_against_reference  # noqa: E402

pytestmark = [
    pytest.mark.triton_interpret,
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]
DEVICE = TRITON_DEVICE
OP = torch.ops.bigkernels.kd_loss_fwd_triton
# V: one partial chunk, exactly one chunk, several chunks with a partial last (BLOCK_V = 32 here)
SHAPES = [(0, 5), (1, 1), (3, 17), (2, 32), (4, 75)]


@pytest.mark.parametrize("dtype", TRITON_FLOAT_DTYPES, ids=[DT_IDS[d] for d in TRITON_FLOAT_DTYPES])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_kd_loss_fwd_triton(dtype, shape, options):
    n, v = shape
    T, alpha, use_labels, ignore, gt_flag = options
    s, t = _logits(n, v, dtype, DEVICE), _logits(n, v, dtype, DEVICE)
    labels = _labels(n, v, ignore, DEVICE) if use_labels else None
    scale = torch.tensor(1.0 / max(1, n), device=DEVICE)
    got = OP(s, t, labels, scale, T, alpha, ignore if use_labels else None, True, gt_flag)
    check_against_reference(got, s, t, labels, scale, T, alpha, ignore if use_labels else None, gt_flag,
                            f"triton {dtype} {shape} {options}")


def test_mixed_dtypes_strided_and_loss_only():
    wide_s = _logits(10, 140, torch.float32, DEVICE)
    s, t = wide_s[::2, :70], _logits(5, 70, torch.float16, DEVICE)
    scale = torch.tensor(0.2, device=DEVICE)
    got = OP(s, t, None, scale, 2.0, 0.0, None, True, True)
    check_against_reference(got, s, t, None, scale, 2.0, 0.0, None, True, "mixed/strided")
    rows, gs, gt = OP(s, t, None, scale, 2.0, 0.0, None, False, False)
    assert gs.numel() == 0 and gt.numel() == 0
    assert_close(rows, got[0], rtol=0, atol=0, what="loss without gradients")


def test_extreme_rows():
    v = 45
    s, t = _logits(3, v, torch.float32, DEVICE), _logits(3, v, torch.float32, DEVICE)
    s[0, 3:20] = float("-inf")
    t[0, 3:20] = float("-inf")
    s[1] = torch.linspace(-80, 80, v)
    s[2] = float("nan")
    labels = torch.tensor([1, 2, -7], device=DEVICE)
    scale = torch.tensor(0.5, device=DEVICE)
    rows, gs, gt = OP(s, t, labels, scale, 1.5, 0.2, -7, True, True)
    assert torch.isfinite(rows).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert rows[2] == 0 and (gs[2] == 0).all() and (gt[2] == 0).all()
    want = ref.kd_loss_fwd(s[1:2], t[1:2], labels[1:2], scale, 1.5, 0.2, -7, True, True)
    assert_close(rows[1:2], want[0], rtol=1e-5, atol=1e-5, what="spread row")
    assert (gs[0, 3:20] == 0).all() and (gt[0, 3:20] == 0).all()


def test_bad_input_is_rejected():
    s, t = _logits(3, 9, torch.float32, DEVICE), _logits(3, 9, torch.float32, DEVICE)
    one = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="must match"):
        OP(s, t[:, :8], None, one, 1.0, 0.0, None, True, False)
    with pytest.raises(ValueError, match="needs labels"):
        OP(s, t, None, one, 1.0, 0.5, None, True, False)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\)"):
        OP(s, t, torch.tensor([0, 9, 1], device=DEVICE), one, 1.0, 0.5, None, True, False)
    with pytest.raises(ValueError, match="temperature"):
        OP(s, t, None, one, -1.0, 0.0, None, True, False)


def test_opcheck():
    s, t = _logits(4, 40, torch.float32, DEVICE), _logits(4, 40, torch.float32, DEVICE)
    labels = _labels(4, 40, -100, DEVICE)
    torch.library.opcheck(OP.default, (s, t, labels, torch.tensor(0.25, device=DEVICE), 2.0, 0.5, -100, True, True))


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("BIGKERNELS_IMPL", "kd_loss_fwd=triton")
    _registry.clear_choice_cache()
    yield
    monkeypatch.undo()
    _registry.clear_choice_cache()


def test_public_losses_through_triton_and_compile(triton_backend):
    """kd_loss / fused_linear_kd_loss with the Triton backend: the definition's values and
    gradients, eager and under torch.compile(fullgraph=True)."""
    assert _registry.choose("kd_loss_fwd", torch.device(DEVICE).type) == "triton"
    torch._dynamo.reset()
    s0, t = _logits(6, 50, torch.float32, DEVICE).view(2, 3, 50), _logits(6, 50, torch.float32, DEVICE).view(2, 3, 50)
    labels = _labels(6, 50, -100, DEVICE).view(2, 3)
    hs0, ws = torch.randn(6, 8, device=DEVICE), torch.randn(50, 8, device=DEVICE)
    ht, wt = torch.randn(6, 12, device=DEVICE), torch.randn(50, 12, device=DEVICE)
    kw = dict(temperature=2.0, labels=labels, ignore_index=-100, alpha=0.5)
    kw_flat = dict(kw, labels=labels.view(-1))

    def losses(s, hs):
        return (bk.nn.functional.kd_loss(s, t, **kw),
                bk.nn.functional.fused_linear_kd_loss(hs, ws, ht, wt, chunk_size=4, **kw_flat))

    s_ref, hs_ref = s0.double().requires_grad_(), hs0.double().requires_grad_()
    want = (ref.kd_loss(s_ref, t.double(), labels, 2.0, -100, 0.5),
            ref.fused_linear_kd_loss(hs_ref, ws.double(), ht.double(), wt.double(), labels.view(-1), 2.0, -100, 0.5))
    (want[0] + want[1]).backward()
    for fn in (losses, torch.compile(losses, fullgraph=True, backend="aot_eager")):
        s, hs = s0.clone().requires_grad_(), hs0.clone().requires_grad_()
        a, b = fn(s, hs)
        (a + b).backward()
        assert_close(a, want[0], rtol=1e-5, atol=1e-6, what="kd_loss")
        assert_close(b, want[1], rtol=1e-5, atol=1e-6, what="fused")
        assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-6, what="d/ds")
        assert_close(hs.grad, hs_ref.grad, rtol=1e-4, atol=1e-5, what="d/dhs")
