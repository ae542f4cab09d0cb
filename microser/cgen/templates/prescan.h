/* Two-pass prenorm 'clip': push the WHOLE utterance here first, then push it again with ${P}_push. */
int ${P}_prescan(${P}_state *st, const float *samples, int n);
