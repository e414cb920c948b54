//! 802.1Q VLANs (see *VLANs* in docs/architecture.md).
//!
//! A VLAN interface is a port of the snapshot like any other (its own
//! addresses, routes, neighbours and MTU) whose frames travel tagged on the
//! device that carries it. The pipeline strips the tag on the way in and
//! works on the interface, and puts the tag back on the way out:
//!
//! - **In:** a frame tagged with a VLAN its device carries has the tag
//!   removed (the MAC addresses move 4 bytes on, over it) and is processed
//!   as received on the VLAN interface. A frame for a VLAN the device does
//!   not carry, or with stacked tags, is dropped as `unknown_vlan`. VLAN 0
//!   (a priority tag) is the device's own untagged network.
//! - **Out:** a frame to transmit on a VLAN interface gets the tag (4 bytes
//!   of headroom; the MAC addresses move back) and leaves on the carrying
//!   device, whichever way it came in.
//! - **Unchanged:** a frame handed to another worker or punted to the
//!   kernel leaves as it came, tag included: the other worker strips it
//!   again, and the kernel has the VLAN's own interface on top of the
//!   device's kernel interface.
//!
//! An untagged frame pays nothing for this when no port carries a VLAN,
//! and one comparison of its egress port otherwise.

use super::*;
use crate::wire::vlan;

impl Pipeline {
    /// A frame tagged 802.1Q on device `p.port`. Out of line: untagged
    /// frames never come here.
    #[inline(never)]
    pub(super) fn tagged(&mut self, snap: &Snapshot, now: u64, p: &mut RxPacket<'_>, ahead: Ahead) -> Verdict {
        let device = p.port;
        let (tci, inner) = {
            let Ok(tag) = vlan::Tag::new_checked(&p.frame()[ethernet::HEADER_LEN..]) else {
                return Verdict::Drop(DropReason::Malformed);
            };
            let b = p.frame();
            ([b[14], b[15]], tag.ethertype())
        };
        if inner == EtherType::VLAN || inner == EtherType::QINQ {
            return Verdict::Drop(DropReason::UnknownVlan);
        }
        let vid = u16::from_be_bytes(tci) & 0x0fff;
        // VLAN 0 is a priority tag: the device's own, untagged network.
        let iface = match vid {
            _ if device >= snap.devices() => None,
            0 => Some(device),
            _ => snap.vlan_interface(device, vid),
        };
        let Some(iface) = iface else {
            return Verdict::Drop(DropReason::UnknownVlan);
        };
        // Strip: the MAC addresses move over the tag.
        let start = p.start;
        p.buf.copy_within(start..start + 12, start + vlan::HEADER_LEN);
        p.start += vlan::HEADER_LEN;
        p.port = iface;
        let verdict = match inner {
            // The pass ahead classified it through the tag too.
            EtherType::IPV4 => self.ipv4(snap, now, p, ahead),
            EtherType::ARP => self.arp(snap, now, iface, p.frame_mut()),
            EtherType::IPV6 if self.punts(iface) => ipv6_to_kernel(p.frame(), iface),
            _ => Verdict::Drop(DropReason::Unsupported),
        };
        match verdict {
            Verdict::Handoff(_) | Verdict::Punt(_) | Verdict::PuntControl(_) => {
                // Leaves as it came, tag and all, from its device (the 4
                // bytes the tag was stripped from are in front of it).
                push_tag(p, p.start - vlan::HEADER_LEN, tci);
                p.port = device;
                match verdict {
                    Verdict::Punt(_) => Verdict::Punt(device),
                    Verdict::PuntControl(_) => Verdict::PuntControl(device),
                    v => v,
                }
            }
            v => v,
        }
    }
}

/// A frame to transmit on VLAN interface `port` (not a device): the tag
/// goes in front of its EtherType, in 4 bytes of headroom, and it leaves
/// on the device carrying the VLAN; without the headroom it is dropped
/// (`no_headroom`).
#[inline(never)]
pub(super) fn tag_egress(snap: &Snapshot, p: &mut RxPacket<'_>, port: u16) -> Verdict {
    let Some(v) = snap.ports().get(usize::from(port)).and_then(|q| q.vlan) else {
        return Verdict::Drop(DropReason::NoRoute);
    };
    let Some(start) = p.start.checked_sub(vlan::HEADER_LEN) else {
        return Verdict::Drop(DropReason::NoHeadroom);
    };
    push_tag(p, start, v.id.to_be_bytes());
    Verdict::Transmit(v.port)
}

/// Puts an 802.1Q tag with control information `tci` in front of the
/// frame's EtherType: the MAC addresses move back to `start`, 4 bytes
/// before the frame's start, and the frame starts there.
fn push_tag(p: &mut RxPacket<'_>, start: usize, tci: [u8; 2]) {
    p.buf.copy_within(start + vlan::HEADER_LEN..start + vlan::HEADER_LEN + 12, start);
    p.buf[start + 12..start + 14].copy_from_slice(&EtherType::VLAN.to_be_bytes());
    p.buf[start + 14..start + 16].copy_from_slice(&tci);
    p.start = start;
}
