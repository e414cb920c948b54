//! Ethernet ports: configuration, queues, start, stop, close, stats, link;
//! and bonds, ports made of several devices by DPDK's bonding driver in
//! 802.3ad (LACP) mode, with their members' link and LACP state.

use crate::error::{DpdkError, strerror};
use crate::mempool::Mempool;
use std::ffi::CString;
use vipgate_dataplane::driver::{
    BondConfig, BondMemberLink, LacpMember, LacpPeer, LacpSelection, LacpState, PortLink, PortStats, TransmitHash,
};
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

/// One member of a bond port: a device EAL probed, which the bond drives
/// (configures, starts, polls) in its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Member {
    /// Its device name, as probed.
    pub(crate) device: String,
    /// Its DPDK port id.
    pub(crate) id: u16,
}

/// Reads the members of the bond `bond`: each one's link, whether the bond
/// counts it active (`rte_eth_bond_active_slaves_get`), and, while it is,
/// its LACP state (`rte_eth_bond_8023ad_slave_info`). Control-path calls
/// that copy what the bonding driver's state machine (on EAL's interrupt
/// thread) last wrote: made by the control plane's periodic poll, never by
/// a worker.
pub(crate) fn read_bond(bond: u16, members: &[Member]) -> Vec<BondMemberLink> {
    let mut active = [0u16; vipgate_ffi::RTE_MAX_ETHPORTS as usize];
    // SAFETY: `active` has room for `active.len()` port ids, which is
    // what DPDK is told; an id that is not a bond makes it return an error.
    let n = unsafe { vipgate_ffi::rte_eth_bond_active_slaves_get(bond, active.as_mut_ptr(), active.len() as u16) };
    let active = &active[..usize::try_from(n).unwrap_or(0).min(active.len())];
    members
        .iter()
        .map(|m| {
            let is_active = active.contains(&m.id);
            BondMemberLink {
                device: m.device.clone(),
                port_id: m.id,
                link: read_link(m.id),
                active: is_active,
                lacp: if is_active { read_lacp(bond, m.id) } else { None },
            }
        })
        .collect()
}

/// The LACP state of the active member `member` of the bond `bond`; `None`
/// if the driver has none for it.
fn read_lacp(bond: u16, member: u16) -> Option<LacpMember> {
    // SAFETY: all-zero is a valid rte_eth_bond_8023ad_slave_info (plain
    // data, an enum whose 0 is UNSELECTED); DPDK fills it.
    let mut info: vipgate_ffi::rte_eth_bond_8023ad_slave_info = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer; ids that are not a mode-4 bond and its
    // active member make DPDK return an error, not fault.
    if unsafe { vipgate_ffi::rte_eth_bond_8023ad_slave_info(bond, member, &mut info) } != 0 {
        return None;
    }
    let selection = match info.selected {
        vipgate_ffi::SELECTED => LacpSelection::Selected,
        vipgate_ffi::STANDBY => LacpSelection::Standby,
        _ => LacpSelection::Unselected,
    };
    Some(LacpMember {
        selection,
        actor: lacp_peer(&info.actor, info.actor_state),
        partner: lacp_peer(&info.partner, info.partner_state),
    })
}

/// An LACP system's parameters from DPDK's `struct port_params` (opaque to
/// Rust: see vipgate-ffi), laid out as in an LACPDU, in network byte
/// order: system priority, system MAC, key, port priority, port number.
fn lacp_peer(params: &vipgate_ffi::port_params, state: u8) -> LacpPeer {
    let mut b = [0u8; 14];
    for (chunk, word) in b.chunks_exact_mut(2).zip(params._bindgen_opaque_blob.iter()) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let be = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let mut system = [0u8; 6];
    system.copy_from_slice(&b[2..8]);
    LacpPeer { system, system_priority: be(0), key: be(8), port: be(12), state: LacpState(state) }
}

/// DPDK's transmit policy for `hash`.
fn xmit_policy(hash: TransmitHash) -> u8 {
    let policy = match hash {
        TransmitHash::Layer2 => vipgate_ffi::BALANCE_XMIT_POLICY_LAYER2,
        TransmitHash::Layer23 => vipgate_ffi::BALANCE_XMIT_POLICY_LAYER23,
        TransmitHash::Layer34 => vipgate_ffi::BALANCE_XMIT_POLICY_LAYER34,
    };
    policy as u8
}

/// Removes the members `added` from the bond `id` named `cname` and frees
/// it: what a bond that failed to start leaves behind.
fn discard_bond(id: u16, cname: &CString, added: &[Member]) {
    for m in added {
        // SAFETY: `m` was added to the bond `id`, which is stopped.
        unsafe { vipgate_ffi::rte_eth_bond_slave_remove(id, m.id) };
    }
    // SAFETY: `cname` names the bond created above, which nothing else
    // uses.
    unsafe { vipgate_ffi::rte_eth_bond_free(cname.as_ptr()) };
}

/// A started DPDK port. Stop and close it with [`Port::close`].
#[derive(Debug)]
pub struct Port {
    id: u16,
    name: String,
    mac: EthernetAddress,
    queues: u16,
    started: bool,
    /// For a bond: its members (empty for any other port).
    members: Vec<Member>,
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

    /// Creates the bond `bond_device` (a name starting with `net_bonding`)
    /// in 802.3ad mode over the probed devices of `bond`, and starts it as
    /// [`Port::start`] starts a device: the bond configures and starts its
    /// members with its own queues, MTU and pool (so each member's rx
    /// queues take mbufs from `pool` too). Its MAC is its first member's.
    ///
    /// The bond's LACP state machine runs on EAL's interrupt thread, every
    /// 100 ms, but its LACPDUs travel only inside rx and tx bursts on the
    /// bond: the workers make those (see `worker.rs`).
    pub fn start_bond(
        name: &str,
        bond_device: &str,
        bond: &BondConfig,
        queues: u16,
        mtu: u16,
        pool: &Mempool,
    ) -> Result<Port, DpdkError> {
        let mut members = Vec::with_capacity(bond.members.len());
        for device_name in &bond.members {
            let (id, _) = device(name, device_name)?;
            members.push(Member { device: device_name.clone(), id });
        }
        let first = members.first().ok_or_else(|| DpdkError::Port {
            name: name.to_owned(),
            op: "creating the bond",
            reason: "a bond needs members".to_owned(),
        })?;
        let cname = CString::new(bond_device).map_err(|_| DpdkError::NulInArgument(bond_device.to_owned()))?;
        // SAFETY: `first.id` is a probed port; the lookup has no side
        // effects.
        let socket = u8::try_from(unsafe { vipgate_ffi::rte_eth_dev_socket_id(first.id) }).unwrap_or(0);
        // SAFETY: EAL is initialised; `cname` is a valid C string, the
        // name of no device yet (the configuration gives every bond its
        // own).
        let rc =
            unsafe { vipgate_ffi::rte_eth_bond_create(cname.as_ptr(), vipgate_ffi::BONDING_MODE_8023AD as u8, socket) };
        let Ok(id) = u16::try_from(rc) else {
            return Err(DpdkError::Port { name: name.to_owned(), op: "creating the bond", reason: strerror(rc) });
        };
        for (i, m) in members.iter().enumerate() {
            // SAFETY: `id` is the bond just created, stopped; `m.id` is a
            // probed port that no one has configured or started.
            let rc = unsafe { vipgate_ffi::rte_eth_bond_slave_add(id, m.id) };
            if rc != 0 {
                discard_bond(id, &cname, &members[..i]);
                return Err(DpdkError::BondMember {
                    name: name.to_owned(),
                    member: m.device.clone(),
                    reason: strerror(rc),
                });
            }
        }
        // SAFETY: `id` is a stopped bond.
        let rc = unsafe { vipgate_ffi::rte_eth_bond_xmit_policy_set(id, xmit_policy(bond.transmit_hash)) };
        if rc != 0 {
            discard_bond(id, &cname, &members);
            return Err(DpdkError::Port {
                name: name.to_owned(),
                op: "setting the bond's transmit hash",
                reason: strerror(rc),
            });
        }
        let mut port = match Port::start_device(name, bond_device, queues, mtu, pool, (RX_DESC, TX_DESC), true) {
            Ok(port) => port,
            Err(e) => {
                discard_bond(id, &cname, &members);
                return Err(e);
            }
        };
        port.members = members;
        // An 802.3ad bond drops every multicast frame, broadcasts (ARP
        // requests) included, unless it is in all-multicast mode; a device
        // alone takes broadcasts without it.
        // SAFETY: `id` is a started port.
        let rc = unsafe { vipgate_ffi::rte_eth_allmulticast_enable(id) };
        if rc != 0 {
            return Err(DpdkError::Port { name: name.to_owned(), op: "enabling all-multicast", reason: strerror(rc) });
        }
        Ok(port)
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
        Port::start_device(name, device_name, queues, mtu, pool, descriptors, false)
    }

    /// [`Port::start_with`]; `bond`: the device is a bond, whose members
    /// are configured only when it starts (with its MTU), so the MTU is
    /// not set through its driver before.
    fn start_device(
        name: &str,
        device_name: &str,
        queues: u16,
        mtu: u16,
        pool: &Mempool,
        descriptors: (u16, u16),
        bond: bool,
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
        // (-ENOTSUP, net_pcap) keeps the MTU configured above. A bond sets
        // its members' MTU itself when it configures them, at start.
        // SAFETY: `id` is a configured, stopped port.
        let rc = if bond { 0 } else { unsafe { vipgate_ffi::rte_eth_dev_set_mtu(id, mtu) } };
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
        let mut port = Port {
            id,
            name: name.to_owned(),
            mac: EthernetAddress(mac.addr_bytes),
            queues,
            started: false,
            members: Vec::new(),
        };
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

    /// For a bond: its members, in configuration order (empty for any
    /// other port).
    pub(crate) fn members(&self) -> &[Member] {
        &self.members
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
        // A bond's close stops its members and removes them from it.
        unsafe { vipgate_ffi::rte_eth_dev_close(self.id) };
        for m in self.members.drain(..) {
            // SAFETY: out of the bond, stopped; closing releases the rx
            // queues the bond set up on it, and their mbufs.
            unsafe { vipgate_ffi::rte_eth_dev_close(m.id) };
        }
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
    use super::{device_max_mtu, lacp_peer};

    #[test]
    fn lacp_parameters_are_read_in_network_byte_order() {
        // Priority 0xffff, system 02:00:00:00:00:01, key 0x00fe (speed
        // unknown, full duplex), port priority 0x00ff, port 2.
        let wire = [0xff, 0xff, 0x02, 0, 0, 0, 0, 0x01, 0x00, 0xfe, 0x00, 0xff, 0x00, 0x02];
        let mut params = vipgate_ffi::port_params::default();
        for (word, chunk) in params._bindgen_opaque_blob.iter_mut().zip(wire.chunks_exact(2)) {
            *word = u16::from_ne_bytes([chunk[0], chunk[1]]);
        }
        let peer = lacp_peer(&params, 0x3d);
        assert_eq!(peer.system, [0x02, 0, 0, 0, 0, 0x01]);
        assert_eq!((peer.system_priority, peer.key, peer.port), (0xffff, 0xfe, 2));
        assert_eq!(peer.state.0, 0x3d);
    }

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
