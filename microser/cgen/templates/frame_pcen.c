    { /* PCEN: causal FIR smoother over the last ${L} mel rows (ring), zeros before the first */
        const int32_t t = st->pcen_n++;
        int d;
        for (b = 0; b < ${nm}; b++)   /* the energy floor, as before the log */
            mel[b] = mel[b] > ${floor} ? mel[b] : ${floor};
        memcpy(st->pcen_ring + (t % ${L}) * ${nm}, mel, ${nm} * sizeof(float));
        for (b = 0; b < ${nm}; b++) {
            float sm = 0.0f;
            for (d = (t < ${L1} ? ${L1} - (int)t : 0); d < ${L}; d++)
                sm += PCEN_H[d] * st->pcen_ring[((t - ${L1} + d) % ${L}) * ${nm} + b];
            feat[b] = powf(mel[b] / powf(${eps} + sm, ${alpha}) + ${delta}, ${r})
                      - ${offset};
        }
    }
