"""Normalising generated template kernels for golden-code tests.

The rules of ``test_golden_forward.normalise``, for any of our templates: the
text from ``def triton_tem_..._<tag>...(`` through the end of its ``@triton.jit``
helper, with

* the kernel name's volatile suffix (fused op names, a counter) dropped:
  ``triton_tem_fused_<tag>``;
* the constexprs that depend on the chosen config or the machine (tile
  sizes, ``FLOAT32_PRECISION``) read ``<config>``;
* trailing spaces and runs of blank lines (left by empty template hooks,
  version dependent) collapsed.

The ``@triton_heuristics.template(...)`` metadata (device, hashes, autotune
picks, num_warps) is outside the extracted text. Shapes and strides are
fixed by each test, so they stay literal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def normalise_kernel(source: str, tag: str, inner: str, config_constexprs: Sequence[str]) -> str:
    """The one template kernel named ``*<tag>*`` whose helper is ``inner``, normalised.

    Args:
        source: Generated code (``CompileResult.source``).
        tag: What the kernel's name contains (``flex_inductor_bwd``).
        inner: The name of its ``@triton.jit`` helper (``_dkdv_inner``), which
            tells apart two kernels of one tag.
        config_constexprs: Constexpr names whose values are replaced by
            ``<config>``.

    Returns:
        The normalised text, ending with one newline.
    """
    lines = source.splitlines()
    found = []
    for start, line in enumerate(lines):
        if not re.match(rf"def triton_tem_\w*{tag}\w*\(", line):
            continue
        end = next(i for i in range(start, len(lines)) if lines[i].startswith("'''"))
        if any(lines[i].startswith(f"def {inner}(") for i in range(start, end)):
            found.append((start, end))
    assert len(found) == 1, f"{len(found)} kernels named *{tag}* with a helper {inner}()"
    start, end = found[0]
    text = "\n".join(line.rstrip() for line in lines[start:end]).strip("\n")
    text = re.sub(rf"triton_tem_\w*{tag}\w*", f"triton_tem_fused_{tag}", text)
    for name in config_constexprs:
        text = re.sub(rf"^(\s+{name} : tl\.constexpr = ).*$", r"\1<config>", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"
