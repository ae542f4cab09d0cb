    while ((got = fread(buf, sizeof(float), 4096, f)) > 0) {
        t0 = TIMER[1];
        if (${P}_prescan(&st, buf, (int)got) != 0) return 4;
        prescan_ticks += t0 - TIMER[1];
    }
    rewind(f);
