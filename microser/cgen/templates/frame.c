/* One analysis frame (st->frame, ${N} samples) -> one feature row -> stage 0. */
static void process_frame(${P}_state *st)
{
    float *xr = st->arena.f, *xi = xr + ${M}, *yr = xr + ${M2}, *yi = xr + ${M3};
    float *pw = xr + ${M4}, *mel = pw + ${nf}, *feat = mel + ${nm};
    int k, b;
${window_stats}${spectrum}
${spectrum_prenorm}        pw[k] = re * re + im * im;
    }
    {
        int off = 0;
        for (b = 0; b < ${nm}; b++) {
            float acc = 0.0f;
            for (k = 0; k < MEL_LEN[b]; k++) acc += pw[MEL_START[b] + k] * MEL_W[off + k];
            off += MEL_LEN[b];
            mel[b] = acc;
        }
    }
${compress}
${store}
    s0_push(st);
}
