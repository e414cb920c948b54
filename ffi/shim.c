/* See shim.h. Compiled by build.rs with libdpdk's pkg-config cflags. */
#include <rte_errno.h>

#include "shim.h"

int vipgate_rte_errno(void)
{
	return rte_errno;
}

void vipgate_rte_errno_set(int value)
{
	rte_errno = value;
}
