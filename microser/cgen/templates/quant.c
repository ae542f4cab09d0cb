/* onnxruntime QuantizeLinear: x / scale, clamp to the int8 range, round half to even, + zero point */
static int quant(float x, float scale, int zp)
{
    float v = x / scale;
    const float lo = (float)(-128 - zp), hi = (float)(127 - zp);
    v = v < lo ? lo : (v > hi ? hi : v);
    return (int)lrintf(v) + zp;
}
