    { /* LayerNorm over (channels, bands) of this row, then ReLU */
        float mean = 0.0f, var = 0.0f;
        int e;
        for (e = 0; e < ${n}; e++) mean += tmp[e];
        mean /= ${n_float};
        for (e = 0; e < ${n}; e++) var += (tmp[e] - mean) * (tmp[e] - mean);
        var /= ${n_float};
        {
            const float inv = 1.0f / sqrtf(var + ${eps});
            for (e = 0; e < ${n}; e++) {
                const float y = (tmp[e] - mean) * inv * LNG${i}[e] + LNB${i}[e];
                ${store}
            }
        }
    }
