/* ${P}_m4_footprint.c (microser.cgen): the smallest program that links every API function of ${P}, so that
   its flash image minus that of an empty main() is the library's flash with the runtime it pulls in (libm, libgcc). */
#include "${P}.h"

#ifdef MICROSER_EMPTY
int main(void)
{
    return 0;
}
#else
static ${P}_state st;
static volatile float samples[${hop}];

int main(void)
{
    float out[3];
    ${P}_init(&st);
${prescan}    (void)${P}_push(&st, (const float *)samples, ${hop});
    return ${P}_result(&st, out);
}
#endif
