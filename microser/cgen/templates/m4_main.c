/* ${P}_m4_main.c (microser.cgen): Cortex-M4 driver for QEMU's mps2-an386 with semihosting. Reads m4_input.f32
   (raw float32 samples) from the host in chunks of ${chunks} samples (cycled), pushes them, and prints
     out <bits> <bits> <bits> <result status>          the 3 outputs as float32 bit patterns
     ticks <push> <prescan> <result> calib <loop instructions> <loop ticks> stack <bytes> samples <n>
   Ticks are counts of the board's CMSDK APB timer 0 (25 MHz); under qemu -icount shift=0 every instruction takes
   1 ns of virtual time, and the calibration loop (2 instructions per turn) gives instructions per tick. The stack
   is painted before the first call: <bytes> is the deepest word the library touched below main's frame. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "${P}.h"

#define TIMER ((volatile uint32_t *)0x40000000u) /* CTRL, VALUE (counts down), RELOAD */
#define PAINT 0xA5C3F00Du

extern uint32_t __stack_limit;
static ${P}_state st;
static float buf[4096];
static const int chunks[] = {${chunks}};

static uint32_t bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

__attribute__((noinline)) static uint32_t calibrate(uint32_t turns)
{
    const uint32_t t0 = TIMER[1];
    __asm__ volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(turns) : : "cc");
    return t0 - TIMER[1];
}

__attribute__((noinline)) static void paint(uint32_t *below)
{
    uint32_t *p = &__stack_limit;
    while (p < below) *p++ = PAINT;
}

int main(void)
{
    volatile uint32_t frame = 0;
    uint32_t *top = (uint32_t *)&frame, *p;
    uint32_t push_ticks = 0, prescan_ticks = 0, result_ticks = 0, t0, calib;
    long n = 0;
    int c = 0, rc;
    size_t got;
    float out[3];
    FILE *f = fopen("m4_input.f32", "rb");
    if (!f) return 2;
    TIMER[0] = 0;
    TIMER[2] = 0xFFFFFFFFu;
    TIMER[1] = 0xFFFFFFFFu;
    TIMER[0] = 1;
    calib = calibrate(1000000u);
    paint(top - 64);
    ${P}_init(&st);
${prescan}    while ((got = fread(buf, sizeof(float), (size_t)chunks[c % (int)(sizeof chunks / sizeof chunks[0])], f)) > 0) {
        c++;
        t0 = TIMER[1];
        if (${P}_push(&st, buf, (int)got) != 0) return 5;
        push_ticks += t0 - TIMER[1];
        n += (long)got;
    }
    fclose(f);
    t0 = TIMER[1];
    rc = ${P}_result(&st, out);
    result_ticks = t0 - TIMER[1];
    for (p = &__stack_limit; p < top && *p == PAINT; p++) {
    }
    printf("out %08lx %08lx %08lx %d\n", (unsigned long)bits(out[0]), (unsigned long)bits(out[1]),
           (unsigned long)bits(out[2]), rc);
    printf("ticks %lu %lu %lu calib 2000000 %lu stack %lu samples %ld\n", (unsigned long)push_ticks,
           (unsigned long)prescan_ticks, (unsigned long)result_ticks, (unsigned long)calib,
           (unsigned long)((char *)top - (char *)p), n);
    return 0;
}
