    for (b = 0; b < ${nm}; b++) {
        float v = logf(mel[b] > ${floor} ? mel[b] : ${floor});
        feat[b] = v${ops};
    }
