//! ARP for IPv4 over Ethernet (RFC 826). Other hardware or protocol types
//! are rejected by [`Packet::new_checked`].

use super::{Error, EthernetAddress, Field, Result, be16, be32, set_be16, set_be32};

mod field {
    use super::Field;
    pub(super) const HTYPE: Field = 0..2;
    pub(super) const PTYPE: Field = 2..4;
    pub(super) const HLEN: usize = 4;
    pub(super) const PLEN: usize = 5;
    pub(super) const OPER: Field = 6..8;
    pub(super) const SHA: Field = 8..14;
    pub(super) const SPA: Field = 14..18;
    pub(super) const THA: Field = 18..24;
    pub(super) const TPA: Field = 24..28;
}

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;

/// ARP operation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Who has TPA? Tell SPA.
    Request,
    /// SPA is at SHA.
    Reply,
    /// Any other code.
    Unknown(u16),
}

impl From<u16> for Operation {
    fn from(v: u16) -> Self {
        match v {
            1 => Operation::Request,
            2 => Operation::Reply,
            x => Operation::Unknown(x),
        }
    }
}

impl From<Operation> for u16 {
    fn from(o: Operation) -> u16 {
        match o {
            Operation::Request => 1,
            Operation::Reply => 2,
            Operation::Unknown(x) => x,
        }
    }
}

/// A view of an Ethernet/IPv4 ARP packet. Protocol addresses are u32 in host
/// byte order.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checks.
    #[inline]
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a buffer after checking its length and that it is Ethernet/IPv4
    /// ARP (hardware type 1, protocol 0x0800, lengths 6 and 4).
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        let b = p.buffer.as_ref();
        if be16(b, field::HTYPE) != 1 || be16(b, field::PTYPE) != 0x0800 || b[field::HLEN] != 6 || b[field::PLEN] != 4 {
            return Err(Error::Malformed);
        }
        Ok(p)
    }

    /// Checks the buffer is long enough.
    #[inline]
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < PACKET_LEN { Err(Error::Truncated) } else { Ok(()) }
    }

    /// Operation.
    pub fn operation(&self) -> Operation {
        be16(self.buffer.as_ref(), field::OPER).into()
    }

    /// Sender hardware address.
    pub fn sender_hw(&self) -> EthernetAddress {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::SHA]);
        EthernetAddress(a)
    }

    /// Sender protocol address.
    pub fn sender_ip(&self) -> u32 {
        be32(self.buffer.as_ref(), field::SPA)
    }

    /// Target hardware address.
    pub fn target_hw(&self) -> EthernetAddress {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::THA]);
        EthernetAddress(a)
    }

    /// Target protocol address.
    pub fn target_ip(&self) -> u32 {
        be32(self.buffer.as_ref(), field::TPA)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes a whole Ethernet/IPv4 ARP packet.
    pub fn emit(
        &mut self,
        op: Operation,
        sender_hw: EthernetAddress,
        sender_ip: u32,
        target_hw: EthernetAddress,
        target_ip: u32,
    ) {
        let b = self.buffer.as_mut();
        set_be16(b, field::HTYPE, 1);
        set_be16(b, field::PTYPE, 0x0800);
        b[field::HLEN] = 6;
        b[field::PLEN] = 4;
        set_be16(b, field::OPER, op.into());
        b[field::SHA].copy_from_slice(&sender_hw.0);
        set_be32(b, field::SPA, sender_ip);
        b[field::THA].copy_from_slice(&target_hw.0);
        set_be32(b, field::TPA, target_ip);
    }
}

/// Writes a broadcast ARP request frame (Ethernet header included) into
/// `buf` and returns its length, or `None` if `buf` is too short. The frame
/// is padded to the 60-byte Ethernet minimum.
pub fn emit_request_frame(buf: &mut [u8], sender_hw: EthernetAddress, sender_ip: u32, target_ip: u32) -> Option<usize> {
    const LEN: usize = 60;
    let buf = buf.get_mut(..LEN)?;
    buf.fill(0);
    let mut eth = super::ethernet::Frame::new_unchecked(&mut *buf);
    eth.set_dst_addr(EthernetAddress::BROADCAST);
    eth.set_src_addr(sender_hw);
    eth.set_ethertype(super::EtherType::ARP);
    Packet::new_unchecked(eth.payload_mut()).emit(
        Operation::Request,
        sender_hw,
        sender_ip,
        EthernetAddress::default(),
        target_ip,
    );
    Some(LEN)
}

/// [`emit_request_frame`], tagged 802.1Q with VLAN `vlan` when given (a
/// 64-byte frame then). Returns the frame's length, or `None` if `buf` is
/// shorter.
pub fn emit_request_frame_on(
    buf: &mut [u8],
    sender_hw: EthernetAddress,
    sender_ip: u32,
    target_ip: u32,
    vlan: Option<u16>,
) -> Option<usize> {
    let Some(id) = vlan else {
        return emit_request_frame(buf, sender_hw, sender_ip, target_ip);
    };
    const LEN: usize = 64;
    let buf = buf.get_mut(..LEN)?;
    let len = emit_request_frame(&mut buf[..60], sender_hw, sender_ip, target_ip)?;
    // The tag goes in front of the EtherType: everything after the MAC
    // addresses moves 4 bytes on.
    buf.copy_within(12..len, 16);
    buf[12..14].copy_from_slice(&super::EtherType::VLAN.to_be_bytes());
    buf[14..16].copy_from_slice(&(id & 0x0fff).to_be_bytes());
    Some(LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Who has 198.18.0.1? Tell 198.18.0.2 (02:00:00:00:00:02).
    const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // htype ptype hlen plen oper
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 198, 18, 0, 2, // sha spa
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 198, 18, 0, 1, // tha tpa
    ];

    #[test]
    fn parse() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(p.operation(), Operation::Request);
        assert_eq!(p.sender_hw(), EthernetAddress([2, 0, 0, 0, 0, 2]));
        assert_eq!(p.sender_ip(), 0xc612_0002);
        assert_eq!(p.target_hw(), EthernetAddress::default());
        assert_eq!(p.target_ip(), 0xc612_0001);
    }

    #[test]
    fn emit() {
        let mut buf = [0xffu8; 28];
        Packet::new_unchecked(&mut buf[..]).emit(
            Operation::Request,
            EthernetAddress([2, 0, 0, 0, 0, 2]),
            0xc612_0002,
            EthernetAddress::default(),
            0xc612_0001,
        );
        assert_eq!(buf, REQUEST);
    }

    #[test]
    fn rejects_other_types_and_short_buffers() {
        assert_eq!(Packet::new_checked(&REQUEST[..27]).unwrap_err(), Error::Truncated);
        let mut v = REQUEST;
        v[3] = 0xdd; // IPv6 protocol type
        assert_eq!(Packet::new_checked(&v[..]).unwrap_err(), Error::Malformed);
        let mut v = REQUEST;
        v[4] = 8;
        assert_eq!(Packet::new_checked(&v[..]).unwrap_err(), Error::Malformed);
    }

    #[test]
    fn request_frame_parses_with_etherparse() {
        let mut buf = [0u8; 64];
        let n = emit_request_frame(&mut buf, EthernetAddress([2, 0, 0, 0, 0, 9]), 0xc612_0101, 0xc612_010b).unwrap();
        assert_eq!(n, 60);
        let sliced = etherparse::SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        match sliced.net {
            Some(etherparse::NetSlice::Arp(arp)) => {
                assert_eq!(arp.operation(), etherparse::ArpOperation::REQUEST);
                assert_eq!(arp.sender_protocol_addr(), &[198, 18, 1, 1]);
                assert_eq!(arp.target_protocol_addr(), &[198, 18, 1, 11]);
            }
            other => panic!("not ARP: {other:?}"),
        }
        let mut short = [0u8; 59];
        assert!(emit_request_frame(&mut short, EthernetAddress::default(), 0, 0).is_none());
    }
}
