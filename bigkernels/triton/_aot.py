"""Ahead-of-time compile of every Triton kernel's AOT cases (the convention is in
``bigkernels/triton/_common.py``), without a GPU: Triton's compiler for a ``GPUTarget`` and the
ptxas it ships. Used by ``tests/test_triton_aot.py``; also runnable on its own, e.g. on a GPU
machine with another Triton version: ``python -m bigkernels.triton._aot`` prints one line per
case and exits non-zero on a failure.

What it reports per case: whether it compiled (else the error's first lines), the shared memory
Triton allocated (``metadata.shared``), and the global loads in the PTX (vectorised
``ld.global*.v2/.v4`` and scalar ones). It also finds every ``@triton.jit`` function in the
modules (by their source) and which of them no case's kernel calls, directly or through other
``@triton.jit`` helpers.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

PACKAGE = "bigkernels.triton"
_VECTOR_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*?\.v[248]\.")
_ANY_LOAD = re.compile(r"\bld\.global\.")
# Pipelined loads (sm_80+): cp.async of 16 or 8 bytes per thread is a vector load, of 4 a scalar one.
_ASYNC_COPY = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)")


@dataclasses.dataclass
class Result:
    module: str
    index: int
    case: object  # AOTCase (in the parent process)
    ok: bool
    error: str = ""
    shared: int = 0
    vector_loads: int = 0
    scalar_loads: int = 0
    seconds: float = 0.0  # CPU seconds of the compile


def kernel_modules() -> List[str]:
    """Every module of the bigkernels.triton package (private ones included)."""
    pkg = importlib.import_module(PACKAGE)
    return sorted(f"{PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if m.name != "_aot")


def jit_functions(module) -> Dict[str, object]:
    """name -> JITFunction of every ``@triton.jit``-decorated function defined in ``module``'s
    source (found by reading the source, so kernels that are not module attributes are found too;
    those map to None)."""
    tree = ast.parse(inspect.getsource(module))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(_is_jit(d) for d in node.decorator_list):
            found[node.name] = getattr(module, node.name, None) if node in tree.body else None
    return found


def _is_jit(dec) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    return (isinstance(target, ast.Attribute) and target.attr == "jit") or (
        isinstance(target, ast.Name) and target.id == "jit")


def _called_jit(fn) -> List[object]:
    """The @triton.jit functions ``fn`` (a JITFunction) calls by name from its globals."""
    from triton.runtime.jit import JITFunction

    tree = ast.parse(fn.src if hasattr(fn, "src") else inspect.getsource(fn.fn))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            g = fn.fn.__globals__.get(node.func.id)
            if isinstance(g, JITFunction):
                out.append(g)
    return out


def covered_closure(kernels) -> set:
    """Every JITFunction reachable from ``kernels`` through calls (ids)."""
    seen, stack = set(), list(kernels)
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        stack.extend(_called_jit(fn))
    return seen


def collect() -> Tuple[Dict[str, list], List[str]]:
    """(module -> its aot_cases(), problems): problems name the modules with @triton.jit functions
    but no ``aot_cases`` and every @triton.jit function no case reaches."""
    cases: Dict[str, list] = {}
    problems: List[str] = []
    jits: Dict[str, Dict[str, object]] = {}
    for name in kernel_modules():
        mod = importlib.import_module(name)
        jits[name] = jit_functions(mod)
        fn = getattr(mod, "aot_cases", None)
        if fn is None:
            if jits[name]:
                problems.append(f"{name} defines @triton.jit functions {sorted(jits[name])} but no aot_cases() "
                                f"(see bigkernels/triton/_common.py)")
            continue
        cases[name] = list(fn())
    reached = covered_closure([c.kernel for cs in cases.values() for c in cs])
    for name, fns in jits.items():
        if name not in cases:
            continue  # reported above
        for fname, fn in sorted(fns.items()):
            if fn is None:
                problems.append(f"{name}.{fname} is a @triton.jit function that is not a module-level attribute: "
                                f"define kernels at module level so an AOT case can name them")
            elif id(fn) not in reached:
                problems.append(f"{name}.{fname} is a @triton.jit function that no AOT case compiles (neither a "
                                f"case's kernel nor called by one): add cases for it to {name}.aot_cases()")
    return cases, problems


# ----- compiling (in worker processes) ----------------------------------------------------------

_CASES: Dict[str, list] = {}


def _case(module: str, index: int):
    if module not in _CASES:
        _CASES[module] = list(importlib.import_module(module).aot_cases())
    return _CASES[module][index]


def count_loads(ptx: str) -> Tuple[int, int]:
    """(vectorised, scalar) global loads in ``ptx``: ``ld.global`` (vector: ``.v2``/``.v4``) and
    ``cp.async`` global-to-shared copies (vector: 8 or 16 bytes)."""
    vec = scalar = 0
    for line in ptx.splitlines():
        if _ANY_LOAD.search(line):
            if _VECTOR_LOAD.search(line):
                vec += 1
            else:
                scalar += 1
        else:
            m = _ASYNC_COPY.search(line)
            if m:
                if int(m.group(1), 0) >= 8:
                    vec += 1
                else:
                    scalar += 1
    return vec, scalar


def compile_case(case) -> Tuple[bool, str, int, str]:
    """(ok, error, shared bytes, ptx) of one case."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(case.kernel, case.full_signature(), dict(case.constexprs), case.attrs())
    try:
        k = triton.compile(src, target=GPUTarget("cuda", case.compile_arch, 32),
                           options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    except Exception as e:  # noqa: BLE001 - every compile failure is a finding
        msg = f"{type(e).__name__}: {e}"
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        keep = [ln for ln in lines if "error" in ln.lower()][:6] or lines[:6]
        return False, "\n".join(keep)[:2000], 0, ""
    return True, "", int(k.metadata.shared), k.asm.get("ptx", "")


def _job(module: str, index: int):
    return _run(_case(module, index))


def _run(case):
    _quiet_mlir()
    t = _cpu_seconds()
    ok, err, shared, ptx = compile_case(case)
    vec, scalar = count_loads(ptx) if ok else (0, 0)
    return ok, err, shared, vec, scalar, _cpu_seconds() - t


def _quiet_mlir() -> None:
    """MLIR prints a reproducer of a failed pass pipeline to stderr: keep it out of test logs (the
    error is reported by the case's result)."""
    if os.environ.get("BIGKERNELS_AOT_VERBOSE") != "1" and not getattr(_quiet_mlir, "done", False):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        _quiet_mlir.done = True


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): what a compile costs CI,
    whatever else runs on the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _job_key(case) -> tuple:
    return (id(case.kernel), tuple(sorted((k, repr(v)) for k, v in case.constexprs.items())),
            tuple(sorted(case.full_signature().items())), tuple(sorted(case.attrs())), case.num_warps,
            case.num_stages, case.compile_arch)


def compile_all(cases: Dict[str, list], workers: Optional[int] = None) -> List[Result]:
    """Compile every case (each distinct compile once), in ``workers`` processes (default:
    BIGKERNELS_AOT_WORKERS, else the CPUs this process may use, at most 4)."""
    import multiprocessing

    jobs: Dict[tuple, Tuple[str, int]] = {}
    owners: List[Tuple[str, int, tuple]] = []
    for module, cs in cases.items():
        for i, c in enumerate(cs):
            key = _job_key(c)
            jobs.setdefault(key, (module, i))
            owners.append((module, i, key))
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = int(os.environ.get("BIGKERNELS_AOT_WORKERS", min(4, cpus)))
    # Longest first (large tiles, many stages) so the pool's tail is short.
    order = sorted(jobs.items(), key=lambda kv: -_cost(cases[kv[1][0]][kv[1][1]]))
    done: Dict[tuple, tuple] = {}
    if workers == 1:
        for key, (m, i) in order:
            done[key] = _run(cases[m][i])
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {key: pool.submit(_job, m, i) for key, (m, i) in order}
            for key, f in futures.items():
                done[key] = f.result()
    results = []
    for module, i, key in owners:
        ok, err, shared, vec, scalar, secs = done[key]
        results.append(Result(module, i, cases[module][i], ok, err, shared, vec, scalar, secs))
    return results


def _cost(case) -> int:
    m = case.constexprs
    tile = 1
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        tile *= int(m.get(k, 1)) if isinstance(m.get(k, 1), int) else 1
    return tile * case.num_stages


def main(argv: Sequence[str] = ()) -> int:
    t0 = time.time()
    cases, problems = collect()
    results = compile_all(cases)
    bad = 0
    for r in results:
        c = r.case
        fit = r.shared <= c.shared_limit
        status = "ok " if r.ok and fit else "BAD"
        bad += status == "BAD"
        print(f"{status} {r.seconds:5.1f}s shared={r.shared:6d}/{c.shared_limit} est={c.estimate} "
              f"ld.v={r.vector_loads} ld.s={r.scalar_loads} {c.group} {c.describe()}"
              + (f"\n    {r.error}" if not r.ok else ""))
    for p in problems:
        print("PROBLEM", p)
    import triton

    print(f"{len(results)} cases, {bad} bad, {len(problems)} problems, triton {triton.__version__}, "
          f"{time.time() - t0:.0f} s")
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
