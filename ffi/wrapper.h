/*
 * The DPDK headers that vipgate's bindings are generated from.
 *
 * build.rs hands this file to bindgen, and the C file of static inline
 * wrappers that bindgen writes includes it too, so everything the dataplane
 * driver calls must be reachable from here. The pkg-config cflags of
 * libdpdk force-include rte_config.h before this file is read.
 */
#ifndef VIPGATE_FFI_WRAPPER_H
#define VIPGATE_FFI_WRAPPER_H

#include <rte_eal.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_lcore.h>
#include <rte_launch.h>
#include <rte_ring.h>
#include <rte_cycles.h>
#include <rte_prefetch.h>
#include <rte_errno.h>
#include <rte_ether.h>
#include <rte_malloc.h>
#include <rte_version.h>
#include <rte_bus_vdev.h>
#include <rte_dev.h>
#include <rte_pause.h>
#include <rte_pdump.h>
#include <rte_eth_bond.h>
#include <rte_eth_bond_8023ad.h>

#endif /* VIPGATE_FFI_WRAPPER_H */
