    for (b = 0; b < ${nm}; b++)
        feat[b] = 10.0f * log10f(mel[b] > ${floor} ? mel[b] : ${floor});
