"""The C text of one library from its plan: `emit(plan) -> {file name: text}`, pure (no compiler, no files).

The source reads top-down as the C compiler needs it: int8 helpers, const tables (front-end, body, head), the
kernels, the FFT, the head, the stages, the framer, the API. Each part comes from the module of its stage
(`emit_frontend`, `emit_body`, `emit_head`, `emit_api`), which fills the C templates of microser/cgen/templates/.
"""

from __future__ import annotations

from microser.cgen import emit_api, emit_body, emit_frontend, emit_head
from microser.cgen.ctext import fill
from microser.cgen.plan import Plan, min_samples
from microser.cgen.ram import state_bytes


def library_prefix(prefix: str, variant: str) -> str:
    """The C prefix of a bundle's library: ``<prefix>_f32`` or ``<prefix>_int8``."""
    return f"{prefix}_{'f32' if variant == 'float32' else 'int8'}"


def emit(plan: Plan, prefix: str | None = None) -> dict[str, str]:
    """The C text of the library for ``plan``: ``{"<prefix>.h", "<prefix>.c", "<prefix>_main.c": text}``; ``prefix``
    defaults to the bundle's name for the plan's variant (``ser_f32``, ``ser_int8``)."""
    prefix = prefix or library_prefix("ser", plan.variant)
    return {f"{prefix}.h": emit_api.header(plan, prefix), f"{prefix}.c": source(plan, prefix),
            f"{prefix}_main.c": emit_api.driver(prefix, plan.fe.prenorm == "clip")}


def source(plan: Plan, prefix: str) -> str:
    """``<prefix>.c``."""
    tables = emit_frontend.tables(plan) + emit_body.tables(plan) + emit_head.tables(plan)
    parts = [fill("source_head.c", P=prefix, U=prefix.upper(), variant=plan.variant, summary=plan.spec.summary()),
             *emit_body.int8_support(plan), "\n".join(tables), *emit_body.helpers(plan), *emit_body.kernels(plan),
             "\n" + emit_frontend.fft(plan), *emit_body.declarations(plan, prefix),
             "\n" + emit_head.head(plan, prefix),
             *(emit_body.stage(plan, i, prefix) for i in range(len(plan.stages))),
             "\n" + emit_frontend.process_frame(plan, prefix) + "\n" + emit_frontend.feed(plan, prefix),
             "\n" + emit_api.api(plan, prefix)]
    return "\n".join(parts)


def library_info(plan: Plan, prefix: str) -> dict:
    """What a bundle says of one library: its prefix, variant, file names, bytes of state and arena, min samples."""
    sizes = state_bytes(plan)
    return {"prefix": prefix, "variant": plan.variant, "header": f"{prefix}.h", "source": f"{prefix}.c",
            "driver": f"{prefix}_main.c", "state_bytes": sizes["state"], "arena_bytes": sizes["arena"],
            "ram_bytes": sizes["total"], "min_samples": min_samples(plan)}
