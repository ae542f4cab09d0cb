"""Dependency-free C99 streaming inference for one Wav2Small-family student: the generator, its RAM and its cost.

``microser.cgen.bundle.generate(bundle_dir, model, spec, int8_onnx_path)`` writes ``bundle_dir/c/``:

    <prefix>_f32.h/.c    float32 library: the whole graph from raw 16 kHz samples
    <prefix>_int8.h/.c   int8 library reproducing the int8 QDQ ONNX graph (microser.compress)
    <prefix>_*_main.c    a small driver: raw float32 audio file + chunk sizes -> 3 numbers
    README.md            the API, the memory figures, how to build

The C API (``P`` = prefix, e.g. ``ser_f32``)::

    P_state st;                      /* caller-owned, plain data (no pointers): sizeof == P_RAM_BYTES */
    P_init(&st);                     /* or P_reset(&st): same thing */
    P_push(&st, samples, n);         /* any n >= 0, as often as wanted; returns 0, or -1 after result() */
    P_result(&st, out3);             /* arousal, dominance, valence of everything pushed; 0, or -1 if too short */

``result`` is final: it flushes the zero padding the offline model applies at the end (frames, "same" conv
padding, max-pool padding) and leaves the state finished (``push`` returns -1 until ``reset``). Because the state
holds no pointers, a running estimate is ``P_state copy = st; P_result(&copy, out3);`` and pushing into ``st`` goes
on. Specs with ``prenorm = "clip"`` (a whole-utterance statistic) get a documented two-pass entry point instead of
a stream: ``P_prescan(&st, samples, n)`` over the whole utterance first, then ``push`` the same samples again
(`bundle.clip_note`).

What is computed, in order (the same definitions as microser.frontends and microser.models.wav2small, read there):

* prenorm: none | running (double accumulators, each sum rounded to float as the graph does; a prior's
  pseudo-count and pseudo-sum of squares, when microser.frontends sets one, added in float) | window (per frame,
  in the spectrum, as the PyTorch graph does) | clip (two passes);
* framing with the spec's zero padding (``center``, ``pad_end``) kept as pending zeros, periodic Hann window
  zero-padded to ``n_fft``;
* FFT: a real FFT of even ``n_fft`` computed as a complex FFT of ``n_fft/2`` points (iterative Stockham autosort,
  mixed radix 4/2/3/5/any, twiddles as const tables) plus the standard split step; odd ``n_fft`` runs the complex
  FFT on all points. No DFT matrix;
* mel filterbank stored as one contiguous non-zero range per band (`plan.MelBands`); log
  (``10 log10 max(e, floor)``, floor = ``frontends.energy_floor(spec)``) or PCEN with its causal FIR smoother kept as a ring of the last ``taps`` mel rows;
* conv blocks row by row (time is the streaming axis): each stage keeps a ring of ``k`` input rows (its receptive
  field in time), computes output row ``j`` as soon as input row ``j*s - p + k - 1`` arrived, and at ``result``
  the rows past the end count as the zero ("same") padding; BatchNorm folded into the conv; LayerNorm over
  (channels, bands) of each row; ReLU; 3x3/2 max-pools the same way with padding ignored;
* head: attention pooling with an online softmax per (channel, band) (running max, running sum, running weighted
  sum), Gram matrix accumulated online (upper triangle), or mean+std with Welford's update; then the Linear.

int8 variant: every tensor the int8 ONNX graph quantizes is stored as int8 with the graph's scale and zero point.
An int8 conv (templates/conv_s8.c) builds im2col columns of two output positions (int16, input zero point
removed), runs a 2x2 int8 x int16 kernel over pairs of output channels with int32 accumulators (templates/mm_s8.c:
SXTB16/SMLAD dual 16-bit MACs on a core with the DSP extension, a loop the host compiler vectorizes otherwise) and
requantizes each accumulator by an exact int32 multiplier and shift (`fixedpoint`). QuantizeLinear of the
front-end output divides by the scale and rounds to nearest even; the front-end and the head run in float exactly
as in the float variant, on the dequantized last body row.

Modules (import the one you need; this package imports none of them, so `ctext` stays light):

    plan           shapes (`shape_plan`), front-end tables, float weights (`float_plan`), `check_exportable`
    qdq            the int8 plan read from the int8 QDQ graph (`int8_plan`)
    fixedpoint     the requantization contract (`fixed_multiplier`, `requantize_reference`)
    ram            the state layout and `streaming_ram` / `streaming_costs` / `streaming_report`
    instr          the instruction cost model (`instruction_features`, `predict_instructions`)
    ctext          C literals (`c_float`, `c_array`) and the templates/ files
    emit           `emit(plan) -> {file name: text}`, pure; per stage: emit_frontend, emit_body, emit_head, emit_api
    toolchain      gcc, the driver, valgrind, the stack walk, the Cortex-M4F build and QEMU run
    bundle         `generate`, `write_library`, the README and the model card's section
"""
