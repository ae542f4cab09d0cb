/* -DMICROSER_TRACE: every int8 row is handed to microser_trace() (defined by the caller: tests compare each
   stage with a reference); tensor 0 is the quantized front-end output, tensor t the output of stage t - 1. */
#ifdef MICROSER_TRACE
void microser_trace(int tensor, int32_t row, const int8_t *q, int n);
#define TRACE(tensor, row, q, n) microser_trace((tensor), (row), (q), (n))
#else
#define TRACE(tensor, row, q, n) ((void)0)
#endif
