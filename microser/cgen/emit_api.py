"""C of the API: the header (sizes, the state struct, the declarations), the functions a caller calls (init, reset,
push with the prenorm, result with the end padding and the flush, prescan for two passes) and the test driver."""

from __future__ import annotations

from microser import SAMPLE_RATE, TARGETS
from microser.frontends import PRENORM_EPS, PRENORM_PRIOR_COUNT, PRENORM_PRIOR_VAR, frame_padding
from microser.cgen.ctext import block, c_float, fill
from microser.cgen.plan import Plan, min_samples
from microser.cgen.ram import C_SIZES, arena_floats, state_bytes, state_members


def header(plan: Plan, prefix: str) -> str:
    """``<prefix>.h``: the size macros, the state struct (persistent members, padding, the scratch arena) and the
    API declarations (templates/header.h)."""
    members = state_members(plan)
    sizes = state_bytes(plan)
    lines = []
    for ctype, name, n, comment in members:
        dim = f"[{n}]" if n != 1 or name.startswith("ring") else ""
        lines.append(f"    {ctype} {name}{dim}; /* {comment} */")
    pad = sizes["state"] - sum(C_SIZES[t] * n for t, _, n, _ in members)
    if pad:
        lines.append(f"    int8_t pad_[{pad}]; /* keeps the arena 8-byte aligned on every ABI */")
    arena = arena_floats(plan)
    two_pass = plan.fe.prenorm == "clip"
    return fill("header.h", P=prefix, U=prefix.upper(), variant=plan.variant, summary=plan.spec.summary(),
                rate=SAMPLE_RATE, targets=", ".join(TARGETS), state_bytes=sizes["state"], arena_bytes=sizes["arena"],
                ram_bytes=sizes["total"], min_samples=min_samples(plan), two_pass=int(two_pass),
                members="\n".join(lines), arena=arena, arena_h=2 * arena, arena_b=4 * arena,
                prescan=fill("prescan.h", P=prefix) if two_pass else "")


def api(plan: Plan, prefix: str) -> str:
    """The API functions (templates/api.c; templates/prescan.c for two-pass specs)."""
    fe = plan.fe
    left, right = frame_padding(fe)
    two_pass = fe.prenorm == "clip"
    return fill("api.c", P=prefix, left=left, right=right, prenorm=_prenorm(plan),
                flush="\n".join(f"    s{i}_flush(st);" for i in range(len(plan.stages))),
                prescan="\n" + fill("prescan.c", P=prefix, eps=c_float(PRENORM_EPS)) if two_pass else "",
                push_guard="    if (n > 0 && st->pn_count == 0) return -2;\n" if two_pass else "",
                result_guard=("    if (st->clip_count != st->pn_count) { out3[0] = out3[1] = out3[2] = 0.0f; "
                              "st->finished = 1; return -3; }\n") if two_pass else "")


def _prenorm(plan: Plan) -> str:
    """C turning sample ``x`` into ``y``: the running prenorm (a prior's float terms from microser.frontends, left
    out when zero), the clip prenorm's second pass, or nothing."""
    if plan.fe.prenorm == "running":
        count, var = PRENORM_PRIOR_COUNT, PRENORM_PRIOR_COUNT * PRENORM_PRIOR_VAR
        return block("prenorm_running.c", n0=f" + {c_float(count)}" if count else "",
                     n0v0=f" + {c_float(var)}" if var else "", eps=c_float(PRENORM_EPS))
    if plan.fe.prenorm == "clip":
        return "        st->clip_count++;\n        y = (x - st->clip_mean) / st->clip_den;"
    return "        y = x;"


def driver(prefix: str, two_pass: bool) -> str:
    """``<prefix>_main.c``, a test/bench driver (templates/driver.c): ``prog AUDIO.f32 [-peek] [CHUNK ...]`` pushes raw
    float32 audio in chunks (sizes cycled) and prints the 3 outputs; ``-peek`` also takes a running result on a copy
    of the state after every chunk; built with ``-DMICROSER_TRACE`` it writes every int8 row to
    ``$MICROSER_TRACE_FILE`` (`microser.cgen.toolchain.read_trace`)."""
    prescan = f"    if ({prefix}_prescan(&st, x, (int)n) != 0) return 4;\n" if two_pass else ""
    return fill("driver.c", P=prefix, prescan=prescan)
