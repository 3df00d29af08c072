"""The one shared compile-test helper.

``compile_and_run(fn, *args)`` resets Dynamo, compiles ``fn`` with
``fullgraph=True`` (so any graph break fails the test), runs it, and returns
the output, the generated code, the number of captured graphs and the names
of our template kernels found in the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch._dynamo
import torch._dynamo.testing
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code

KERNEL_DEF = re.compile(r"^def (triton_\w+)\(", re.MULTILINE)


@dataclass
class CompileResult:
    """What one compiled run produced."""

    output: object
    code: list[str] = field(default_factory=list)
    frame_count: int = 0
    graphs: list = field(default_factory=list)
    # The compiled callable (forward only), to call again without recompiling.
    compiled: object = None

    @property
    def source(self) -> str:
        return "\n".join(self.code)

    def kernels(self, tag: str) -> list[str]:
        """Distinct Triton kernel names in the generated code containing ``tag``."""
        return sorted({name for name in KERNEL_DEF.findall(self.source) if tag in name})

    def op_calls(self, op_name: str = "flex_inductor_attention") -> int:
        """Calls of our op in the Dynamo-captured graphs."""
        return sum(
            1
            for gm in self.graphs
            for node in gm.graph.nodes
            if node.op == "call_function" and getattr(node.target, "__name__", "") == op_name
        )


def compile_and_run(
    fn, *args, backend: str = "inductor", dynamic=None, grad_outputs=None, **kwargs
) -> CompileResult:
    """Compile ``fn`` with ``fullgraph=True`` and run it once.

    Args:
        fn: The function or module to compile.
        *args: Its inputs.
        backend: ``"inductor"`` (code is captured) or any Dynamo backend name.
        dynamic: Passed to ``torch.compile``.
        grad_outputs: If given, also run the backward,
            ``torch.autograd.backward(output, grad_outputs)``, inside the code
            capture: AOTAutograd compiles the backward at its first call, so
            this is how a test sees the backward's generated code. Gradients
            accumulate into the inputs' ``.grad``.
        **kwargs: Keyword inputs of ``fn``.

    Returns:
        A :class:`CompileResult`.
    """
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    counter = torch._dynamo.testing.CompileCounterWithBackend(recording_backend)
    forward = torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic)
    compiled = forward
    if grad_outputs is not None:

        def compiled(*args, **kwargs):
            output = forward(*args, **kwargs)
            torch.autograd.backward(output, grad_outputs)
            return output

    with inductor_config.patch(fx_graph_cache=False):
        if backend == "inductor":
            output, code = run_and_get_code(compiled, *args, **kwargs)
        else:
            output, code = compiled(*args, **kwargs), []
    return CompileResult(
        output=output, code=list(code), frame_count=counter.frame_count, graphs=graphs,
        compiled=forward,
    )
