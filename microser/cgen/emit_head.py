"""C of the head: its const weights, ``head_push`` (pooling one float row at a time: attention with an online
softmax, the Gram matrix's upper triangle, or Welford's mean and variance) and ``head_final`` (the pooled features
through the Linear)."""

from __future__ import annotations

from microser.cgen.ctext import block, c_array, c_float
from microser.cgen.plan import Plan, head_features


def tables(plan: Plan) -> list[str]:
    """The attention's value and score 1x1 convs (attention pooling), then the Linear."""
    h = plan.head
    t = []
    if plan.pooling.startswith("attention"):
        t += [c_array("float", "HV_W", h["v_w"]), c_array("float", "HV_B", h["v_b"]),
              c_array("float", "HS_W", h["s_w"]), c_array("float", "HS_B", h["s_b"])]
    return t + [c_array("float", "FC_W", h["fc_w"]), c_array("float", "FC_B", h["fc_b"])]


def head(plan: Plan, prefix: str) -> str:
    """``head_push()`` and ``head_final()`` (templates/head*.c)."""
    c, f = plan.tensors[-1].channels, plan.tensors[-1].bands
    if plan.pooling.startswith("attention"):
        pool = [block("head_attention.c", C=c, F=f)]
        features = [f"    for (c = 0; c < {c * f}; c++) feat[c] = st->att_acc[c] / st->att_sum[c];"]
        if plan.pooling == "attention+gram":
            pool.append(block("head_gram.c", C=c, F=f))
            features.append(block("head_gram_final.c", C=c, CF=c * f, bands_float=c_float(f)))
    else:
        pool = [block("head_meanstd.c", CF=c * f)]
        features = [block("head_meanstd_final.c", CF=c * f, eps=c_float(plan.head["eps"]))]
    return block("head.c", P=prefix, C=c, F=f, pool="\n".join(pool), features="\n".join(features),
                 n_features=head_features(plan))
