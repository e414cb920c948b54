//! The ports' links: each port's link as last read, what changed since the
//! read before, and the rule that says when no uplink works.
//!
//! Owns: [`PortLinks`] (the last reading of every port, a bond's members
//! too, and their changes),
//! and [`uplinks_down`], the one definition of "every port that reaches
//! the routers is down", which makes the announcer withdraw every VIP and
//! which `GetHealth` and the metrics report. Must not: read a device (the
//! daemon reads the links, every [`LINK_POLL_INTERVAL`], and passes the
//! readings in), nor touch the announcement interface.
//!
//! Which ports reach the routers is the operator's call (`[[ports]] uplink
//! = true`): the gateway cannot tell an upstream port from a port to the
//! backends (routing sessions may run on both), and a driver that cannot
//! see its link (a net_tap whose tap was moved to another network
//! namespace reports it down for good) must not withdraw the VIPs unless
//! someone asked for it.
#![forbid(unsafe_code)]

use std::time::Duration;

pub use vipgate_dataplane::driver::{BondMemberLink, LacpMember, LacpPeer, LacpSelection, LacpState, PortLink};

/// How often the daemon reads every port's link
/// (`rte_eth_link_get_nowait`, on the control plane's thread): the most a
/// link change waits before it shows, and before the VIPs are withdrawn or
/// announced again for it.
pub const LINK_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// One port's link, as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortLinkStatus {
    /// The port's name.
    pub name: String,
    /// Whether it reaches the routers (`[[ports]] uplink`).
    pub uplink: bool,
    /// The link as last read; `None` before the first reading, or when the
    /// driver cannot tell. A bond's link is up while any member's is (the
    /// bonding driver's rule), whatever LACP says: see `members`.
    pub link: Option<PortLink>,
    /// For a bond: its members as last read, in configuration order (empty
    /// for any other port, and before the first reading).
    pub members: Vec<BondMemberLink>,
}

/// A bond member changed between two readings: its link, whether the bond
/// counts it active, or whether it carries traffic ([`BondMemberLink::in_use`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberChange {
    /// The bond port's name.
    pub port: String,
    /// The member before (`None`: not read yet).
    pub from: Option<BondMemberLink>,
    /// The member now.
    pub to: BondMemberLink,
}

/// What of a member counts as a change: its link up or down, active or
/// not, and whether it carries traffic. The steps LACP goes through on its
/// way (sync, collecting) are not changes of their own.
fn member_significant(m: &BondMemberLink) -> (Option<bool>, bool, bool) {
    (m.link.map(|l| l.up), m.active, m.in_use())
}

/// A port's link changed between two readings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkChange {
    /// The port's name.
    pub port: String,
    /// Whether it reaches the routers.
    pub uplink: bool,
    /// The link before (`None`: unknown).
    pub from: Option<PortLink>,
    /// The link now (`None`: unknown).
    pub to: Option<PortLink>,
}

/// What of a link counts as a change: up or down, and while up its speed
/// and duplex (a down link's speed and duplex are whatever the driver left
/// there).
fn significant(link: Option<PortLink>) -> Option<(bool, Option<u32>, bool)> {
    link.map(|l| if l.up { (true, l.speed_mbps, l.full_duplex) } else { (false, None, false) })
}

/// Whether the VIPs must be withdrawn for lack of a link: at least one port
/// is an uplink, and every uplink's link was read down. A link the driver
/// cannot report counts as working (nothing says it is not), and without
/// any uplink the links never withdraw anything.
pub fn uplinks_down<'a>(ports: impl IntoIterator<Item = &'a PortLinkStatus>) -> bool {
    let mut any = false;
    for p in ports.into_iter().filter(|p| p.uplink) {
        any = true;
        if p.link.is_none_or(|l| l.up) {
            return false;
        }
    }
    any
}

/// Every port's link as last read, in port order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortLinks {
    ports: Vec<PortLinkStatus>,
}

impl PortLinks {
    /// The ports `(name, uplink)`, in port order, none read yet.
    pub fn new<S: Into<String>>(ports: impl IntoIterator<Item = (S, bool)>) -> PortLinks {
        PortLinks {
            ports: ports
                .into_iter()
                .map(|(name, uplink)| PortLinkStatus { name: name.into(), uplink, link: None, members: Vec::new() })
                .collect(),
        }
    }

    /// Takes a reading of every port (`readings[i]` is port `i`'s; missing
    /// ones count as unknown) and returns the ports whose link changed, in
    /// port order. The first reading of a port whose driver reports its
    /// link is a change (from unknown).
    pub fn update(&mut self, readings: &[Option<PortLink>]) -> Vec<LinkChange> {
        let mut changes = Vec::new();
        for (i, p) in self.ports.iter_mut().enumerate() {
            let to = readings.get(i).copied().flatten();
            if significant(to) != significant(p.link) {
                changes.push(LinkChange { port: p.name.clone(), uplink: p.uplink, from: p.link, to });
            }
            p.link = to;
        }
        changes
    }

    /// Takes a reading of every bond's members (`readings[i]` is port
    /// `i`'s, empty for a port that is not a bond) and returns the members
    /// that changed, in port and member order. A member's first reading is
    /// a change.
    pub fn update_members(&mut self, readings: &[Vec<BondMemberLink>]) -> Vec<MemberChange> {
        let mut changes = Vec::new();
        for (i, p) in self.ports.iter_mut().enumerate() {
            let to = readings.get(i).cloned().unwrap_or_default();
            for (j, m) in to.iter().enumerate() {
                let from = p.members.get(j).filter(|f| f.port_id == m.port_id);
                if from.map(member_significant) != Some(member_significant(m)) {
                    changes.push(MemberChange { port: p.name.clone(), from: from.cloned(), to: m.clone() });
                }
            }
            p.members = to;
        }
        changes
    }

    /// Every port, in port order.
    pub fn ports(&self) -> &[PortLinkStatus] {
        &self.ports
    }

    /// [`uplinks_down`] of these ports.
    pub fn uplinks_down(&self) -> bool {
        uplinks_down(&self.ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Option<PortLink> = Some(PortLink { up: true, speed_mbps: Some(10_000), full_duplex: true });
    const DOWN: Option<PortLink> = Some(PortLink { up: false, speed_mbps: None, full_duplex: false });

    fn links(ports: &[(&str, bool)], readings: &[Option<PortLink>]) -> PortLinks {
        let mut l = PortLinks::new(ports.iter().copied());
        l.update(readings);
        l
    }

    #[test]
    fn every_uplink_down_withdraws_and_one_uplink_up_is_enough() {
        let ports = [("outside-a", true), ("outside-b", true), ("inside", false)];
        assert!(links(&ports, &[DOWN, DOWN, UP]).uplinks_down(), "the inside port does not reach the routers");
        assert!(!links(&ports, &[DOWN, UP, DOWN]).uplinks_down(), "one uplink works");
        assert!(!links(&ports, &[UP, UP, DOWN]).uplinks_down());
    }

    #[test]
    fn without_uplinks_links_never_withdraw() {
        assert!(!links(&[("a", false), ("b", false)], &[DOWN, DOWN]).uplinks_down());
        assert!(!links(&[], &[]).uplinks_down());
        assert!(!PortLinks::new([("a", false)]).uplinks_down());
    }

    #[test]
    fn a_link_the_driver_cannot_report_counts_as_working() {
        let ports = [("a", true), ("b", true)];
        assert!(!links(&ports, &[DOWN, None]).uplinks_down());
        // Before the first reading nothing is known: nothing is withdrawn.
        assert!(!PortLinks::new(ports).uplinks_down());
        // A reading shorter than the port list leaves the rest unknown.
        assert!(!links(&ports, &[DOWN]).uplinks_down());
    }

    fn member(link_up: bool, active: bool, actor: u8, partner: u8) -> BondMemberLink {
        let peer = |state| LacpPeer { state: LacpState(state), ..LacpPeer::default() };
        BondMemberLink {
            device: "net_tap0".to_owned(),
            port_id: 3,
            link: Some(PortLink { up: link_up, speed_mbps: None, full_duplex: true }),
            active,
            lacp: active.then_some(LacpMember {
                selection: LacpSelection::Selected,
                actor: peer(actor),
                partner: peer(partner),
            }),
        }
    }

    #[test]
    fn a_members_link_and_whether_it_carries_traffic_are_changes_lacps_steps_are_not() {
        let mut l = PortLinks::new([("plain", false), ("bond", true)]);
        let waiting = member(true, true, 0x45, 0x05);
        let first = l.update_members(&[vec![], vec![waiting.clone()]]);
        assert_eq!(first, vec![MemberChange { port: "bond".to_owned(), from: None, to: waiting.clone() }]);
        // In sync, collecting: not carrying traffic yet, no change.
        assert_eq!(l.update_members(&[vec![], vec![member(true, true, 0x1d, 0x1f)]]), vec![]);
        let both = member(true, true, 0x3d, 0x3f);
        let converged = l.update_members(&[vec![], vec![both.clone()]]);
        assert_eq!(converged.len(), 1);
        assert!(converged[0].to.in_use());
        assert_eq!(l.ports()[1].members, vec![both]);
        // The partner stops distributing (its side went down, or it
        // timed out): a change.
        assert_eq!(l.update_members(&[vec![], vec![member(true, true, 0x3d, 0x07)]]).len(), 1);
        // The link goes: the bond drops it from its active members.
        let down = l.update_members(&[vec![], vec![member(false, false, 0, 0)]]);
        assert_eq!(down.len(), 1);
        assert!(!down[0].to.active);
        assert!(l.ports()[0].members.is_empty());
    }

    #[test]
    fn changes_are_reported_once_and_only_what_matters_changes() {
        let mut l = PortLinks::new([("a", true), ("b", false)]);
        let first = l.update(&[UP, None]);
        assert_eq!(first, vec![LinkChange { port: "a".to_owned(), uplink: true, from: None, to: UP }]);
        assert_eq!(l.update(&[UP, None]), vec![], "the same reading again changes nothing");

        let down = l.update(&[DOWN, None]);
        assert_eq!(down.len(), 1);
        assert_eq!((down[0].from, down[0].to), (UP, DOWN));
        // A down link whose driver left another speed or duplex behind is
        // still the same down link.
        let stale = Some(PortLink { up: false, speed_mbps: Some(1000), full_duplex: true });
        assert_eq!(l.update(&[stale, None]), vec![]);

        assert_eq!(l.update(&[UP, None]).len(), 1, "back up");
        let slower = Some(PortLink { up: true, speed_mbps: Some(1000), full_duplex: true });
        assert_eq!(l.update(&[slower, None]).len(), 1, "renegotiated at another speed");
        assert_eq!(l.update(&[None, None]).len(), 1, "the driver stopped reporting");
        assert_eq!(l.ports()[0].link, None);
    }
}
