//! Ethernet ports: configuration, queues, start, stop, close, stats, link.

use crate::error::{DpdkError, strerror};
use crate::mempool::Mempool;
use std::ffi::CString;
use vipgate_dataplane::driver::{PortLink, PortStats};
use vipgate_dataplane::wire::EthernetAddress;

/// Descriptors per rx queue of a port.
pub(crate) const RX_DESC: u16 = 1024;
/// Descriptors per tx queue of a port.
pub(crate) const TX_DESC: u16 = 1024;

/// Reads port `id`'s counters from its driver; zeros if it cannot report
/// them.
pub(crate) fn read_stats(id: u16) -> PortStats {
    // SAFETY: all-zero is a valid rte_eth_stats.
    let mut s: vipgate_ffi::rte_eth_stats = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer; reading a port's stats is thread-safe,
    // and an id that is not (or no longer) a port makes DPDK return an
    // error, not fault.
    if unsafe { vipgate_ffi::rte_eth_stats_get(id, &mut s) } != 0 {
        return PortStats::default();
    }
    PortStats {
        ipackets: s.ipackets,
        opackets: s.opackets,
        ibytes: s.ibytes,
        obytes: s.obytes,
        imissed: s.imissed,
        ierrors: s.ierrors,
        oerrors: s.oerrors,
        rx_nombuf: s.rx_nombuf,
    }
}

/// Reads port `id`'s link without waiting for it to settle
/// (`rte_eth_link_get_nowait`); `None` if the driver cannot tell. A
/// control-path call (a register read, or an ioctl for a tap): made by
/// the control plane's periodic poll, never by a worker.
pub(crate) fn read_link(id: u16) -> Option<PortLink> {
    // SAFETY: all-zero is a valid rte_eth_link (plain data); DPDK fills it.
    let mut link: vipgate_ffi::rte_eth_link = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer; an id that is not (or no longer) a port
    // makes DPDK return an error, not fault. Called only from the main
    // lcore's thread, like every other control call on ports.
    if unsafe { vipgate_ffi::rte_eth_link_get_nowait(id, &mut link) } != 0 {
        return None;
    }
    let up = u32::from(link.link_status()) == vipgate_ffi::RTE_ETH_LINK_UP;
    let speed = link.link_speed;
    let known = up && speed != vipgate_ffi::RTE_ETH_SPEED_NUM_NONE && speed != vipgate_ffi::RTE_ETH_SPEED_NUM_UNKNOWN;
    Some(PortLink {
        up,
        speed_mbps: known.then_some(speed),
        full_duplex: u32::from(link.link_duplex()) == vipgate_ffi::RTE_ETH_LINK_FULL_DUPLEX,
    })
}

/// The largest MTU a device takes, as ethdev checks it: at most its
/// `max_mtu`, and its largest frame (`max_rx_pktlen`) less the Ethernet
/// overhead, which is the difference of the two when the driver reports a
/// `max_mtu`, else 18 (header and CRC).
pub(crate) fn device_max_mtu(max_mtu: u16, max_rx_pktlen: u32) -> u32 {
    let overhead =
        if max_mtu != u16::MAX && max_rx_pktlen > u32::from(max_mtu) { max_rx_pktlen - u32::from(max_mtu) } else { 18 };
    u32::from(max_mtu).min(max_rx_pktlen.saturating_sub(overhead))
}

/// The largest MTU of the probed device `device_name` (see
/// [`device_max_mtu`]), for the port `name`.
pub(crate) fn max_mtu_of(name: &str, device_name: &str) -> Result<u32, DpdkError> {
    let (_, info) = device(name, device_name)?;
    Ok(device_max_mtu(info.max_mtu, info.max_rx_pktlen))
}

/// The port id and the device info of the probed device `device_name`, for
/// the port `name`.
fn device(name: &str, device_name: &str) -> Result<(u16, vipgate_ffi::rte_eth_dev_info), DpdkError> {
    let cdev = CString::new(device_name).map_err(|_| DpdkError::NulInArgument(device_name.to_owned()))?;
    let mut id: u16 = 0;
    // SAFETY: EAL is initialised; cdev is a valid C string; `id` is a
    // valid out-pointer.
    if unsafe { vipgate_ffi::rte_eth_dev_get_port_by_name(cdev.as_ptr(), &mut id) } != 0 {
        return Err(DpdkError::PortNotFound { name: name.to_owned(), device: device_name.to_owned() });
    }
    // SAFETY: all-zero is a valid rte_eth_dev_info (plain data); DPDK
    // fills it.
    let mut info: vipgate_ffi::rte_eth_dev_info = unsafe { std::mem::zeroed() };
    // SAFETY: `id` is a probed port; `info` is a valid out-pointer.
    let rc = unsafe { vipgate_ffi::rte_eth_dev_info_get(id, &mut info) };
    if rc != 0 {
        return Err(DpdkError::Port { name: name.to_owned(), op: "reading device info", reason: strerror(rc) });
    }
    Ok((id, info))
}

/// A started DPDK port. Stop and close it with [`Port::close`].
#[derive(Debug)]
pub struct Port {
    id: u16,
    name: String,
    mac: EthernetAddress,
    queues: u16,
    started: bool,
}

impl Port {
    /// Looks up the probed device `device_name` (a vdev name such as
    /// `net_tap0`, or a PCI address), checks that it takes `mtu` and that
    /// `pool`'s mbufs hold its frames whole, configures `queues` rx and tx
    /// queues (RSS over IP/TCP/UDP when more than one; never scatter, so
    /// every frame arrives in one mbuf) with that MTU, sets the queues up
    /// with `pool` and starts the port.
    pub fn start(name: &str, device_name: &str, queues: u16, mtu: u16, pool: &Mempool) -> Result<Port, DpdkError> {
        Port::start_with(name, device_name, queues, mtu, pool, (RX_DESC, TX_DESC))
    }

    /// [`Port::start`] with `(rx, tx)` descriptors per queue (before the
    /// device adjusts them).
    pub(crate) fn start_with(
        name: &str,
        device_name: &str,
        queues: u16,
        mtu: u16,
        pool: &Mempool,
        descriptors: (u16, u16),
    ) -> Result<Port, DpdkError> {
        let err = |op, rc: i32| DpdkError::Port { name: name.to_owned(), op, reason: strerror(rc) };
        let (id, info) = device(name, device_name)?;
        if queues > info.max_rx_queues || queues > info.max_tx_queues {
            return Err(DpdkError::Port {
                name: name.to_owned(),
                op: "configuring queues",
                reason: format!(
                    "{queues} queues requested, device supports {} rx / {} tx",
                    info.max_rx_queues, info.max_tx_queues
                ),
            });
        }

        let max = device_max_mtu(info.max_mtu, info.max_rx_pktlen);
        if u32::from(mtu) > max || mtu < info.min_mtu {
            return Err(DpdkError::Port {
                name: name.to_owned(),
                op: "setting the MTU",
                reason: format!(
                    "device {device_name} cannot take MTU {mtu}: its MTU is from {} to {max} (max_mtu {}, max_rx_pktlen {})",
                    info.min_mtu, info.max_mtu, info.max_rx_pktlen
                ),
            });
        }
        // The pipeline reads an mbuf's first segment only: a frame must fit
        // one. The pool is sized for the largest port (mempool::frame_room);
        // this catches a pool made otherwise.
        let room = u32::from(pool.data_room()).saturating_sub(vipgate_ffi::RTE_PKTMBUF_HEADROOM);
        if room < u32::from(mtu) + crate::mempool::FRAME_OVERHEAD {
            return Err(DpdkError::Port {
                name: name.to_owned(),
                op: "setting the MTU",
                reason: format!("frames of MTU {mtu} do not fit the pool's {room}-byte mbufs"),
            });
        }

        // SAFETY: all-zero is the documented default rte_eth_conf.
        let mut conf: vipgate_ffi::rte_eth_conf = unsafe { std::mem::zeroed() };
        // The MTU from the start (ethdev checks it against the device);
        // offloads stay empty: no RTE_ETH_RX_OFFLOAD_SCATTER, and with
        // buffers as large as the largest frame no driver needs to chain.
        conf.rxmode.mtu = u32::from(mtu);
        if queues > 1 {
            let wanted = vipgate_ffi::RTE_ETH_RSS_IP | vipgate_ffi::RTE_ETH_RSS_TCP | vipgate_ffi::RTE_ETH_RSS_UDP;
            conf.rxmode.mq_mode = vipgate_ffi::RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_hf = wanted & info.flow_type_rss_offloads;
        }
        // SAFETY: `id` is a probed, stopped port; `conf` is initialised.
        let rc = unsafe { vipgate_ffi::rte_eth_dev_configure(id, queues, queues, &conf) };
        if rc != 0 {
            return Err(err("configuring", rc));
        }
        // Also through the driver: some apply the MTU only there (net_tap
        // sets its kernel interface's). A driver without an MTU setter
        // (-ENOTSUP, net_pcap) keeps the MTU configured above.
        // SAFETY: `id` is a configured, stopped port.
        let rc = unsafe { vipgate_ffi::rte_eth_dev_set_mtu(id, mtu) };
        if rc != 0 && rc != -libc::ENOTSUP {
            return Err(DpdkError::Port {
                name: name.to_owned(),
                op: "setting the MTU",
                reason: format!("the device refuses MTU {mtu}: {}", strerror(rc)),
            });
        }
        let (mut rxd, mut txd) = descriptors;
        // SAFETY: valid port and in/out pointers.
        let rc = unsafe { vipgate_ffi::rte_eth_dev_adjust_nb_rx_tx_desc(id, &mut rxd, &mut txd) };
        if rc != 0 {
            return Err(err("adjusting descriptor counts", rc));
        }
        // SAFETY: `id` is configured; socket id lookup has no side effects.
        let socket = unsafe { vipgate_ffi::rte_eth_dev_socket_id(id) };
        let socket = if socket < 0 { 0 } else { socket as u32 };
        for q in 0..queues {
            // SAFETY: queue index < configured count; NULL conf selects the
            // driver's defaults; the pool outlives the port (closed first).
            let rc =
                unsafe { vipgate_ffi::rte_eth_rx_queue_setup(id, q, rxd, socket, std::ptr::null(), pool.as_ptr()) };
            if rc == -libc::ENOMEM {
                return Err(DpdkError::Port {
                    name: name.to_owned(),
                    op: "setting up an rx queue",
                    reason: format!(
                        "the mbuf pool ({} mbufs, {} in use) cannot fill {rxd} more rx descriptors; raise [dataplane] mbufs to at least ports x workers x {} plus headroom",
                        pool.size(),
                        pool.in_use(),
                        u32::from(rxd) + u32::from(txd)
                    ),
                });
            }
            if rc != 0 {
                return Err(err("setting up an rx queue", rc));
            }
            // SAFETY: as above, for tx.
            let rc = unsafe { vipgate_ffi::rte_eth_tx_queue_setup(id, q, txd, socket, std::ptr::null()) };
            if rc != 0 {
                return Err(err("setting up a tx queue", rc));
            }
        }
        // SAFETY: all-zero is a valid rte_ether_addr; DPDK fills it.
        let mut mac: vipgate_ffi::rte_ether_addr = unsafe { std::mem::zeroed() };
        // SAFETY: valid port and out-pointer.
        let rc = unsafe { vipgate_ffi::rte_eth_macaddr_get(id, &mut mac) };
        if rc != 0 {
            return Err(err("reading the MAC address", rc));
        }
        let mut port = Port { id, name: name.to_owned(), mac: EthernetAddress(mac.addr_bytes), queues, started: false };
        // SAFETY: the port is configured with all its queues set up.
        let rc = unsafe { vipgate_ffi::rte_eth_dev_start(id) };
        if rc != 0 {
            port.close();
            return Err(err("starting", rc));
        }
        port.started = true;
        Ok(port)
    }

    /// DPDK port id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Operator-facing name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// MAC address.
    pub fn mac(&self) -> EthernetAddress {
        self.mac
    }

    /// Number of rx (and tx) queues.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Driver counters; zeros if the driver cannot report them.
    pub fn stats(&self) -> PortStats {
        read_stats(self.id)
    }

    /// Stops and closes the port; its queues release every mbuf they hold.
    /// Workers must have stopped polling it.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if self.started {
            // SAFETY: no worker polls the port any more (caller's contract).
            unsafe { vipgate_ffi::rte_eth_dev_stop(self.id) };
            self.started = false;
        }
        // SAFETY: the port is stopped; close releases its queues and mbufs.
        unsafe { vipgate_ffi::rte_eth_dev_close(self.id) };
        self.id = u16::MAX;
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if self.id != u16::MAX {
            self.shut();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::device_max_mtu;

    #[test]
    fn a_devices_largest_mtu_is_read_as_ethdev_checks_it() {
        // DPDK 22.11's net_tap: no max_mtu, 1522-byte frames.
        assert_eq!(device_max_mtu(u16::MAX, 1522), 1504);
        // net_pcap: no limit reported but ethdev's own.
        assert_eq!(device_max_mtu(u16::MAX, u32::MAX), u32::from(u16::MAX));
        // A NIC reporting both: its own overhead (here 26, with VLAN tags).
        assert_eq!(device_max_mtu(9702, 9728), 9702);
        assert_eq!(device_max_mtu(9000, 9026), 9000);
        // A max_mtu above what its frames allow.
        assert_eq!(device_max_mtu(1500, 1400), 1382);
    }
}
