/* m4_startup.c (microser/cgen/templates): reset for a bare Cortex-M4F image: vector table (initial stack pointer,
   reset handler, every fault parked in a loop), FPU enabled (CPACR CP10/CP11), .data copied from its load address,
   .bss zeroed, then main(). With -DMICROSER_SEMIHOSTING, newlib's stdio goes to the host (rdimon) and main's
   return value becomes the emulator's exit status. */
#include <stdint.h>
#include <string.h>

extern uint32_t __data_start__, __data_end__, __data_load__, __bss_start__, __bss_end__, __stack_top;
extern int main(void);
void reset_handler(void);
#ifdef MICROSER_SEMIHOSTING
extern void initialise_monitor_handles(void);
extern void exit(int status);
#endif

static void park(void)
{
    for (;;) {
    }
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))&__stack_top, reset_handler, park, park, park, park, park, 0, 0, 0, 0, park, park, 0, park, park};

void reset_handler(void)
{
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: full access to CP10 and CP11 (the FPU) */
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    memcpy(&__data_start__, &__data_load__, (size_t)((char *)&__data_end__ - (char *)&__data_start__));
    memset(&__bss_start__, 0, (size_t)((char *)&__bss_end__ - (char *)&__bss_start__));
#ifdef MICROSER_SEMIHOSTING
    initialise_monitor_handles();
    exit(main());
#else
    (void)main();
    park();
#endif
}
