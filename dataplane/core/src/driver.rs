//! The plain data the DPDK driver (`vipgate-dpdk`) is built from and
//! reports: how to build the dataplane, each port's settings (a bond's
//! too), and a port's driver counters and link, and a bond member's LACP
//! state.
//!
//! They live here, beside the packet core, rather than in the driver, so
//! that the configuration and the API (and the client built on them) can
//! name them without linking DPDK. Nothing here touches a device.

use crate::pipeline::PipelineConfig;

/// One port to open.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// Operator-facing name.
    pub name: String,
    /// The device's name after EAL probing: a vdev name such as `net_tap0`
    /// or a PCI address such as `0000:03:00.0`. For a bond, the name the
    /// driver gives the bond it creates (`net_bonding...`).
    pub device: String,
    /// The port is a bond of these members (`None`: the device alone).
    pub bond: Option<BondConfig>,
    /// The port's MTU (set on the device at start).
    pub mtu: u16,
    /// The name of the port's kernel interface (the exception path), or
    /// `None` for none.
    pub kernel_interface: Option<String>,
}

/// How to build the dataplane.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// Ports in dense index order.
    pub ports: Vec<PortConfig>,
    /// Mbufs in the pool.
    pub mbufs: u32,
    /// Per-lcore mbuf cache.
    pub mbuf_cache: u32,
    /// Idle workers sleep this long after many empty polls (0: never).
    pub idle_sleep_us: u32,
    /// Pipeline tunables.
    pub pipeline: PipelineConfig,
}

/// Counters kept by a port's driver (hardware or PMD): the totals of
/// DPDK's `rte_eth_stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Packets received.
    pub ipackets: u64,
    /// Packets sent.
    pub opackets: u64,
    /// Bytes received.
    pub ibytes: u64,
    /// Bytes sent.
    pub obytes: u64,
    /// Packets dropped by the hardware because rx queues were full.
    pub imissed: u64,
    /// Receive errors.
    pub ierrors: u64,
    /// Transmit errors.
    pub oerrors: u64,
    /// Receive mbuf allocation failures.
    pub rx_nombuf: u64,
}

/// A port's link as its driver reports it (DPDK's `rte_eth_link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortLink {
    /// The link is up (carrier, and for a tap: its kernel side up).
    pub up: bool,
    /// The negotiated speed in Mb/s; `None` when the driver does not say
    /// (or the link is down).
    pub speed_mbps: Option<u32>,
    /// Full duplex (meaningless while the link is down).
    pub full_duplex: bool,
}

/// How a bond picks the member that sends a frame: a hash of the frame's
/// headers, so that one flow always leaves by one member (in order) and
/// many flows spread over all of them. DPDK's `BALANCE_XMIT_POLICY_*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransmitHash {
    /// Source and destination MAC: one member per neighbour (a gateway
    /// behind one router would use one member only).
    Layer2,
    /// MACs and IP addresses.
    Layer23,
    /// IP addresses and TCP/UDP ports: the flows to one router spread over
    /// every member. The default.
    #[default]
    Layer34,
}

impl TransmitHash {
    /// Every policy, in the order of its name in the configuration.
    pub const ALL: [TransmitHash; 3] = [TransmitHash::Layer2, TransmitHash::Layer23, TransmitHash::Layer34];

    /// Its name in the configuration (`transmit_hash = "layer34"`).
    pub fn name(self) -> &'static str {
        match self {
            TransmitHash::Layer2 => "layer2",
            TransmitHash::Layer23 => "layer23",
            TransmitHash::Layer34 => "layer34",
        }
    }

    /// The policy named `name` (see [`TransmitHash::name`]).
    pub fn parse(name: &str) -> Option<TransmitHash> {
        TransmitHash::ALL.into_iter().find(|h| h.name() == name)
    }
}

/// A port that is a bond of devices in IEEE 802.3ad (LACP) mode: DPDK's
/// bonding driver in its mode 4, over devices EAL probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BondConfig {
    /// The members' device names after EAL probing (as
    /// [`PortConfig::device`]), in configuration order: the first one's MAC
    /// becomes the bond's.
    pub members: Vec<String>,
    /// How frames are spread over the members.
    pub transmit_hash: TransmitHash,
}

/// The state bits an LACP actor or partner advertises (IEEE 802.1AX
/// 6.4.2.3, the `state` octet of an LACPDU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LacpState(pub u8);

impl LacpState {
    /// Active LACP (sends LACPDUs whatever the partner does).
    pub const ACTIVITY: u8 = 0x01;
    /// Short timeout: asks the other side for an LACPDU every second (else
    /// every 30 s).
    pub const TIMEOUT: u8 = 0x02;
    /// The link may be aggregated.
    pub const AGGREGATION: u8 = 0x04;
    /// The link is attached to the right aggregator.
    pub const SYNCHRONIZATION: u8 = 0x08;
    /// Frames received on the link are taken.
    pub const COLLECTING: u8 = 0x10;
    /// Frames are sent on the link.
    pub const DISTRIBUTING: u8 = 0x20;
    /// No LACPDU received (or none lately): the partner's values are
    /// defaults, not what a partner said.
    pub const DEFAULTED: u8 = 0x40;
    /// The partner's information timed out.
    pub const EXPIRED: u8 = 0x80;

    /// Each bit's name, lowest first.
    pub const NAMES: [(u8, &'static str); 8] = [
        (Self::ACTIVITY, "activity"),
        (Self::TIMEOUT, "short_timeout"),
        (Self::AGGREGATION, "aggregation"),
        (Self::SYNCHRONIZATION, "synchronization"),
        (Self::COLLECTING, "collecting"),
        (Self::DISTRIBUTING, "distributing"),
        (Self::DEFAULTED, "defaulted"),
        (Self::EXPIRED, "expired"),
    ];

    /// Whether every bit of `bits` is set.
    pub fn has(self, bits: u8) -> bool {
        self.0 & bits == bits
    }

    /// In sync, collecting and distributing: the link carries the
    /// aggregate's traffic in this direction.
    pub fn in_use(self) -> bool {
        self.has(Self::SYNCHRONIZATION | Self::COLLECTING | Self::DISTRIBUTING)
    }

    /// The names of the bits set, lowest first.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES.iter().filter(|(bit, _)| self.has(*bit)).map(|(_, name)| *name).collect()
    }
}

/// Where LACP's selection logic put a member (DPDK's
/// `rte_bond_8023ad_selection`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LacpSelection {
    /// Not attached to an aggregator (no partner yet, or a partner that
    /// does not match the others').
    #[default]
    Unselected,
    /// Could join the aggregator, held back.
    Standby,
    /// Attached to the aggregator.
    Selected,
}

impl LacpSelection {
    /// Its name in the API and the logs.
    pub fn name(self) -> &'static str {
        match self {
            LacpSelection::Unselected => "unselected",
            LacpSelection::Standby => "standby",
            LacpSelection::Selected => "selected",
        }
    }
}

/// One side of an LACP conversation on a member (an actor or a partner):
/// the system, the key of its aggregate, its port, and its state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LacpPeer {
    /// The system's MAC (all zeros: none heard yet).
    pub system: [u8; 6],
    /// The system's priority.
    pub system_priority: u16,
    /// The aggregation key: members of one aggregate share it.
    pub key: u16,
    /// The port number on that system.
    pub port: u16,
    /// Its state bits.
    pub state: LacpState,
}

/// A bond member's LACP state machine, as DPDK's bonding driver last left
/// it (`rte_eth_bond_8023ad_slave_info`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LacpMember {
    /// Where selection put it.
    pub selection: LacpSelection,
    /// What the gateway advertises on it.
    pub actor: LacpPeer,
    /// What the switch (or host) at the other end advertises, as last
    /// received.
    pub partner: LacpPeer,
}

impl LacpMember {
    /// The member carries traffic both ways: selected, and both sides in
    /// sync, collecting and distributing.
    pub fn in_use(&self) -> bool {
        self.selection == LacpSelection::Selected && self.actor.state.in_use() && self.partner.state.in_use()
    }
}

/// One member of a bond port, as last read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BondMemberLink {
    /// The member's device name (as probed).
    pub device: String,
    /// Its DPDK port id.
    pub port_id: u16,
    /// Its link; `None` when its driver does not report it.
    pub link: Option<PortLink>,
    /// The bond counts it active: its link is up, so LACP runs on it.
    pub active: bool,
    /// Its LACP state; `None` while it is not active (the bonding driver
    /// runs LACP on active members only).
    pub lacp: Option<LacpMember>,
}

impl BondMemberLink {
    /// The member carries traffic: active, and [`LacpMember::in_use`].
    pub fn in_use(&self) -> bool {
        self.active && self.lacp.is_some_and(|l| l.in_use())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_hashes_round_trip_by_name() {
        for h in TransmitHash::ALL {
            assert_eq!(TransmitHash::parse(h.name()), Some(h));
        }
        assert_eq!(TransmitHash::parse("layer3+4"), None);
        assert_eq!(TransmitHash::default(), TransmitHash::Layer34);
    }

    #[test]
    fn lacp_state_bits_are_named_and_in_use_needs_sync_collecting_distributing() {
        // Linux's bond once converged, lacp_rate fast: 0x3f.
        let s = LacpState(0x3f);
        assert_eq!(
            s.names(),
            ["activity", "short_timeout", "aggregation", "synchronization", "collecting", "distributing"]
        );
        assert!(s.in_use());
        // Attached, not yet collecting.
        assert!(!LacpState(0x0d).in_use());
        // DPDK's actor before any LACPDU: active, aggregatable, defaulted.
        assert_eq!(LacpState(0x45).names(), ["activity", "aggregation", "defaulted"]);
        let peer = |state| LacpPeer { state: LacpState(state), ..LacpPeer::default() };
        let m = LacpMember { selection: LacpSelection::Selected, actor: peer(0x3d), partner: peer(0x3f) };
        assert!(m.in_use());
        assert!(!LacpMember { partner: peer(0x0f), ..m }.in_use(), "the partner is not collecting");
        assert!(!LacpMember { selection: LacpSelection::Standby, ..m }.in_use());
        let member = BondMemberLink { active: true, lacp: Some(m), ..BondMemberLink::default() };
        assert!(member.in_use());
        assert!(!BondMemberLink { active: false, ..member.clone() }.in_use());
    }
}
