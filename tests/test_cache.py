"""Cache safety: our op is cacheable, and a change to the package invalidates the cache.

Inductor's FX graph cache and AOTAutograd's cache key on the captured graph.
Our op is declared cacheable, and every call carries the package's code
version (a content hash of its sources and templates) in ``kernel_options``,
so that editing a template or a lowering changes the key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

import flex_inductor
from flex_inductor import flex_attention, mods
from flex_inductor._version import CODE_VERSION, CODE_VERSION_KEY

REPO = Path(__file__).resolve().parents[1]


def _compile_once(fn, *args):
    """A compile in a fresh Dynamo state; returns the output and the cache counters."""
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
        out = torch.compile(fn, backend="inductor", fullgraph=True)(*args)
        if out.requires_grad:
            out.sum().backward()
    return out, dict(counters["inductor"]), dict(counters["aot_autograd"])


def _alibi_case(device, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 17, 16, generator=gen).to(device).requires_grad_(requires_grad)
        for _ in range(3)
    )
    score_mod = mods.alibi(2, device=device)
    return (lambda q, k, v: flex_attention(q, k, v, score_mod=score_mod)), (q, k, v)


def test_second_compile_hits_the_caches(tmp_path, device):
    fn, args = _alibi_case(device, requires_grad=True)
    with fresh_cache(dir=str(tmp_path)):
        first, inductor1, aot1 = _compile_once(fn, *args)
        second, inductor2, aot2 = _compile_once(fn, *args)
    # Forward and backward graphs are each compiled once, then read back.
    assert inductor1.get("fxgraph_cache_miss", 0) >= 1
    assert inductor1.get("fxgraph_cache_hit", 0) == 0
    assert inductor2.get("fxgraph_cache_hit", 0) == inductor1["fxgraph_cache_miss"]
    assert inductor2.get("fxgraph_cache_miss", 0) == 0
    assert aot1.get("autograd_cache_miss", 0) == 1 and aot2.get("autograd_cache_hit", 0) == 1
    torch.testing.assert_close(first, second)


def test_code_version_is_in_the_graph_and_keys_the_cache(tmp_path, device, monkeypatch):
    fn, args = _alibi_case(device)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=record, fullgraph=True)(*args)
    (node,) = [n for gm in graphs for n in gm.graph.nodes if "flex_inductor" in str(n.target)]
    assert node.args[8][CODE_VERSION_KEY] == CODE_VERSION

    with fresh_cache(dir=str(tmp_path)):
        _, first, _ = _compile_once(fn, *args)
        # What a new release of the package looks like to the cache.
        monkeypatch.setattr(flex_inductor._dispatch, "CODE_VERSION", "0" * 16)
        _, changed, _ = _compile_once(fn, *args)
    assert first.get("fxgraph_cache_miss", 0) == 1
    assert changed.get("fxgraph_cache_miss", 0) == 1 and changed.get("fxgraph_cache_hit", 0) == 0


# ---------------------------------------------------------------------------
# An edit to a template in a copy of the package invalidates the cache
# ---------------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    import flex_inductor
    import flex_inductor.lowering
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    from flex_inductor import flex_attention, mods
    from flex_inductor._version import CODE_VERSION

    marker = sys.argv[1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen).to(device) for _ in range(3))
    score_mod = mods.alibi(2, device=device)

    def attention(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod)

    hits, misses, all_code = [], [], []
    # Twice, from a fresh Dynamo state: the second compile must read the cache.
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        with inductor_config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
            compiled = torch.compile(attention, backend="inductor", fullgraph=True)
            out, code = run_and_get_code(compiled, q, k, v)
        hits.append(counters["inductor"]["fxgraph_cache_hit"])
        misses.append(counters["inductor"]["fxgraph_cache_miss"])
        all_code.extend(code)
    expected = flex_inductor.flex_attention_reference(
        q.double(), k.double(), v.double(), score_mod
    )
    print(json.dumps({
        "package": flex_inductor.__file__,
        "lowering": flex_inductor.lowering.__file__,
        "version": CODE_VERSION,
        "hits": hits,
        "misses": misses,
        "marker_in_code": marker in "\\n".join(all_code),
        "error": (out.double() - expected).abs().max().item(),
    }))
    """
)


def _copy_package(root: Path) -> Path:
    """The package laid out as installed: lowering/ and templates/ inside flex_inductor/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = root / "flex_inductor"
    shutil.copytree(REPO / "flex_inductor", package, ignore=ignore)
    shutil.copytree(REPO / "lowering", package / "lowering", ignore=ignore)
    shutil.copytree(REPO / "templates", package / "templates", ignore=ignore)
    return root


def _probe(tmp_path: Path, package_root: Path, cache: Path, marker: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(package_root)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    env["TRITON_CACHE_DIR"] = str(cache / "triton")
    if not torch.cuda.is_available():
        env["FLEX_INDUCTOR_INTERPRET"] = "1"  # so that our template is what runs
    # cwd is the temporary directory: the repository must not shadow the copy.
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, marker],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, f"probe failed:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(package_root)), result["package"]
    assert result["lowering"].startswith(str(package_root)), result["lowering"]
    assert result["error"] < 1e-4
    return result


def test_template_edit_invalidates_the_cache(tmp_path):
    marker = f"flex_inductor cache test {uuid.uuid4().hex}"
    cache = tmp_path / "inductor_cache"
    original = _copy_package(tmp_path / "original")
    edited = _copy_package(tmp_path / "edited")
    template = edited / "flex_inductor" / "templates" / "flex_forward.py.jinja"
    lines = template.read_text().splitlines(keepends=True)
    kernel = next(i for i, line in enumerate(lines) if line.startswith("{{def_kernel"))
    lines.insert(kernel + 1, f"    # {marker}\n")
    template.write_text("".join(lines))

    # The unedited package fills the cache, then reads it back.
    first = _probe(tmp_path, original, cache, marker)
    assert first["misses"] == [1, 0] and first["hits"] == [0, 1]
    assert not first["marker_in_code"]

    # The edited package, in a new process with the same cache, must not
    # replay the old kernel: a new code version, a miss, the edited template.
    changed = _probe(tmp_path, edited, cache, marker)
    assert changed["version"] != first["version"]
    assert changed["misses"] == [1, 0] and changed["hits"] == [0, 1]
    assert changed["marker_in_code"], "the edited template was not compiled"
