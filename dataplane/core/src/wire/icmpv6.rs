//! ICMPv6 (RFC 4443) and the Neighbor Discovery messages (RFC 4861): the
//! header, echo fields, the packet-too-big MTU, neighbour solicitation and
//! advertisement fields, a bounded walk over NDP options, and builders for
//! the two neighbour messages the dataplane sends.
//!
//! The checksum covers an IPv6 pseudo-header, so the checksum methods take
//! the addresses of the enclosing IPv6 packet. This module checks lengths
//! only; RFC 4861 section 7.1.1's other validity rules (hop limit 255,
//! code 0, target not multicast) are the caller's.

use super::{Error, EthernetAddress, Field, Result, be16, be32, set_be16};
use crate::checksum;

mod field {
    use super::Field;
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const TYPE_CODE: Field = 0..2;
    pub(super) const CHECKSUM: Field = 2..4;
    pub(super) const IDENT: Field = 4..6;
    pub(super) const SEQ: Field = 6..8;
    pub(super) const MTU: Field = 4..8;
    /// The neighbour advertisement flags byte (R, S, O in the top bits).
    pub(super) const NA_FLAGS: usize = 4;
    /// Reserved bytes of NS and NA after the type, code and checksum.
    pub(super) const ND_RESERVED: Field = 4..8;
    pub(super) const TARGET: Field = 8..24;
    /// The link-layer address option right after an NS or NA target.
    pub(super) const LL_OPTION: Field = 24..32;
}

/// Header length (type, code, checksum and the 4-byte rest-of-header).
pub const HEADER_LEN: usize = 8;

/// Length of a neighbour solicitation or advertisement without options:
/// the header and the 16-byte target address.
pub const ND_LEN: usize = 24;

/// Length of a source or target link-layer address option for Ethernet
/// (RFC 4861 section 4.6.1: length 1, that is 8 bytes, with a 6-byte MAC).
pub const LINK_LAYER_OPTION_LEN: usize = 8;

/// Length of the neighbour solicitation and advertisement that
/// [`emit_neighbor_solicitation`] and [`emit_neighbor_advertisement`] write:
/// [`ND_LEN`] and one link-layer address option.
pub const ND_WITH_LL_LEN: usize = ND_LEN + LINK_LAYER_OPTION_LEN;

/// Most NDP options [`NdpOptions`] yields before it stops with
/// [`NdpError::TooMany`].
///
/// Neighbour solicitations and advertisements carry one link-layer address
/// option, plus a nonce (RFC 3971, RFC 7527) or a few SEND options at most;
/// router advertisements, which vipgate does not act on, carry a handful of
/// prefix, MTU and DNS options. Sixteen is well above all of these while
/// keeping a crafted message of hundreds of 8-byte options to a short walk.
pub const MAX_NDP_OPTIONS: usize = 16;

/// ICMPv6 message types named by vipgate.
pub mod message {
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 1;
    /// Packet too big (carries the next-hop MTU).
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 3;
    /// Parameter problem.
    pub const PARAMETER_PROBLEM: u8 = 4;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Router solicitation.
    pub const ROUTER_SOLICITATION: u8 = 133;
    /// Router advertisement.
    pub const ROUTER_ADVERTISEMENT: u8 = 134;
    /// Neighbour solicitation.
    pub const NEIGHBOR_SOLICITATION: u8 = 135;
    /// Neighbour advertisement.
    pub const NEIGHBOR_ADVERTISEMENT: u8 = 136;
    /// Redirect.
    pub const REDIRECT: u8 = 137;
}

/// Neighbour advertisement flags, as they sit in the first byte after the
/// checksum (RFC 4861 section 4.4).
pub mod na_flags {
    /// Router flag: the sender is a router.
    pub const ROUTER: u8 = 0x80;
    /// Solicited flag: the advertisement answers a solicitation.
    pub const SOLICITED: u8 = 0x40;
    /// Override flag: the advertisement should replace a cached address.
    pub const OVERRIDE: u8 = 0x20;
}

/// NDP option types read or written here (RFC 4861 section 4.6).
pub mod ndp_option {
    /// Source link-layer address.
    pub const SOURCE_LINK_LAYER_ADDR: u8 = 1;
    /// Target link-layer address.
    pub const TARGET_LINK_LAYER_ADDR: u8 = 2;
}

/// Where the NDP options of a message of type `msg_type` start, or `None`
/// if that type carries none.
#[inline]
pub fn ndp_options_offset(msg_type: u8) -> Option<usize> {
    match msg_type {
        message::ROUTER_SOLICITATION => Some(8),
        message::ROUTER_ADVERTISEMENT => Some(16),
        message::NEIGHBOR_SOLICITATION | message::NEIGHBOR_ADVERTISEMENT => Some(ND_LEN),
        message::REDIRECT => Some(40),
        _ => None,
    }
}

super::view! {
    #[inline] =>
    /// A view of an ICMPv6 message (the whole upper-layer payload).
    Packet
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks the buffer holds the 8-byte header. Longer fixed parts (the
    /// target of NS and NA) are checked by the accessors that read them.
    #[inline]
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN { Err(Error::Truncated) } else { Ok(()) }
    }

    /// Message type.
    #[inline]
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    /// Message code.
    #[inline]
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    /// Checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Echo identifier (echo messages only).
    #[inline]
    pub fn echo_ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Echo sequence number (echo messages only).
    #[inline]
    pub fn echo_seq(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SEQ)
    }

    /// Next-hop MTU (packet-too-big messages only).
    #[inline]
    pub fn mtu(&self) -> u32 {
        be32(self.buffer.as_ref(), field::MTU)
    }

    /// Router flag (neighbour advertisements only).
    #[inline]
    pub fn na_router(&self) -> bool {
        self.buffer.as_ref()[field::NA_FLAGS] & na_flags::ROUTER != 0
    }

    /// Solicited flag (neighbour advertisements only).
    #[inline]
    pub fn na_solicited(&self) -> bool {
        self.buffer.as_ref()[field::NA_FLAGS] & na_flags::SOLICITED != 0
    }

    /// Override flag (neighbour advertisements only).
    #[inline]
    pub fn na_override(&self) -> bool {
        self.buffer.as_ref()[field::NA_FLAGS] & na_flags::OVERRIDE != 0
    }

    /// Target address of a neighbour solicitation or advertisement (or the
    /// target of a redirect), or `None` if the message is too short to
    /// hold one.
    #[inline]
    pub fn target_addr(&self) -> Option<[u8; 16]> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.buffer.as_ref().get(field::TARGET)?);
        Some(a)
    }

    /// The NDP options of this message, bounded by [`MAX_NDP_OPTIONS`].
    /// Empty for types that carry none (see [`ndp_options_offset`]); a
    /// single [`NdpError::Truncated`] if the message is shorter than its
    /// fixed part.
    #[inline]
    pub fn ndp_options(&self) -> NdpOptions<'_> {
        let b = self.buffer.as_ref();
        match ndp_options_offset(self.msg_type()) {
            None => NdpOptions::new(&[]),
            Some(at) => match b.get(at..) {
                Some(rest) => NdpOptions::new(rest),
                None => NdpOptions { rest: &[], yielded: 0, failed: Some(NdpError::Truncated) },
            },
        }
    }

    /// The first source link-layer address option carrying a MAC, if any.
    /// Fails if the options are malformed (zero length, truncated, too many)
    /// before or at that option.
    #[inline]
    pub fn source_link_addr(&self) -> core::result::Result<Option<EthernetAddress>, NdpError> {
        self.link_addr(ndp_option::SOURCE_LINK_LAYER_ADDR)
    }

    /// The first target link-layer address option carrying a MAC, if any.
    /// Fails like [`source_link_addr`](Self::source_link_addr).
    #[inline]
    pub fn target_link_addr(&self) -> core::result::Result<Option<EthernetAddress>, NdpError> {
        self.link_addr(ndp_option::TARGET_LINK_LAYER_ADDR)
    }

    fn link_addr(&self, kind: u8) -> core::result::Result<Option<EthernetAddress>, NdpError> {
        for opt in self.ndp_options() {
            let opt = opt?;
            if opt.kind() == kind
                && let Some(mac) = opt.link_layer_addr()
            {
                return Ok(Some(mac));
            }
        }
        Ok(None)
    }

    /// True if the checksum verifies for a message sent from `src` to `dst`.
    #[inline]
    pub fn verify_checksum(&self, src: &[u8; 16], dst: &[u8; 16]) -> bool {
        checksum::verify_icmpv6(src, dst, self.buffer.as_ref())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets type and code, updating the checksum incrementally.
    #[inline]
    pub fn set_type_code(&mut self, msg_type: u8, code: u8) {
        let b = self.buffer.as_mut();
        let old = be16(b, field::TYPE_CODE);
        let new = u16::from_be_bytes([msg_type, code]);
        let c = checksum::update16(be16(b, field::CHECKSUM), old, new);
        set_be16(b, field::TYPE_CODE, new);
        set_be16(b, field::CHECKSUM, c);
    }

    /// Writes a fresh checksum over the whole message, for one sent from
    /// `src` to `dst`.
    #[inline]
    pub fn fill_checksum(&mut self, src: &[u8; 16], dst: &[u8; 16]) {
        let b = self.buffer.as_mut();
        set_be16(b, field::CHECKSUM, 0);
        let c = checksum::icmpv6(src, dst, b);
        set_be16(b, field::CHECKSUM, c);
    }
}

/// Why the NDP options of a message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NdpError {
    /// An option (or the message's fixed part) runs past the end.
    #[error("NDP option truncated")]
    Truncated,
    /// An option with length 0, which RFC 4861 section 4.6 says must cause
    /// the message to be discarded.
    #[error("NDP option with length 0")]
    ZeroLength,
    /// More than [`MAX_NDP_OPTIONS`] options.
    #[error("too many NDP options")]
    TooMany,
}

impl From<NdpError> for Error {
    /// [`NdpError::Truncated`] is [`Error::Truncated`]; anything else is
    /// [`Error::Malformed`].
    fn from(e: NdpError) -> Error {
        match e {
            NdpError::Truncated => Error::Truncated,
            _ => Error::Malformed,
        }
    }
}

/// One NDP option: type, length and body, as the bytes of the option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NdpOption<'a> {
    bytes: &'a [u8],
}

impl<'a> NdpOption<'a> {
    /// Option type.
    #[inline]
    pub fn kind(&self) -> u8 {
        self.bytes[0]
    }

    /// The whole option, type and length bytes included (a multiple of 8
    /// bytes, at least 8).
    #[inline]
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The MAC of a source or target link-layer address option of length 1
    /// (Ethernet), or `None` for any other option.
    #[inline]
    pub fn link_layer_addr(&self) -> Option<EthernetAddress> {
        match *self.bytes {
            [ndp_option::SOURCE_LINK_LAYER_ADDR | ndp_option::TARGET_LINK_LAYER_ADDR, 1, a, b, c, d, e, f] => {
                Some(EthernetAddress([a, b, c, d, e, f]))
            }
            _ => None,
        }
    }
}

/// Iterator over NDP options. It yields at most [`MAX_NDP_OPTIONS`] options
/// and at most one error, after which it ends, so it always terminates;
/// every option it yields is at least 8 bytes and within the message.
#[derive(Debug, Clone)]
pub struct NdpOptions<'a> {
    rest: &'a [u8],
    yielded: usize,
    failed: Option<NdpError>,
}

impl<'a> NdpOptions<'a> {
    /// Iterates over the options in `bytes` (everything after a message's
    /// fixed part).
    #[inline]
    pub fn new(bytes: &'a [u8]) -> Self {
        NdpOptions { rest: bytes, yielded: 0, failed: None }
    }

    #[inline]
    fn fail(&mut self, e: NdpError) -> Option<core::result::Result<NdpOption<'a>, NdpError>> {
        self.rest = &[];
        Some(Err(e))
    }
}

impl<'a> Iterator for NdpOptions<'a> {
    type Item = core::result::Result<NdpOption<'a>, NdpError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            return self.fail(e);
        }
        let len = match *self.rest {
            [] => return None,
            [_] => return self.fail(NdpError::Truncated),
            [_, 0, ..] => return self.fail(NdpError::ZeroLength),
            [_, units, ..] => usize::from(units) * 8,
        };
        if self.yielded == MAX_NDP_OPTIONS {
            return self.fail(NdpError::TooMany);
        }
        if self.rest.len() < len {
            return self.fail(NdpError::Truncated);
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        self.yielded += 1;
        Some(Ok(NdpOption { bytes }))
    }
}

/// Writes the type, code, zero checksum, the reserved word `word` and the
/// target of a neighbour message, then a link-layer address option of
/// `kind`, into `buf`. Returns [`ND_WITH_LL_LEN`].
fn emit_nd(
    buf: &mut [u8],
    msg_type: u8,
    word: [u8; 4],
    target: &[u8; 16],
    kind: u8,
    mac: EthernetAddress,
) -> Result<usize> {
    let Some(b) = buf.get_mut(..ND_WITH_LL_LEN) else {
        return Err(Error::Truncated);
    };
    b[field::TYPE] = msg_type;
    b[field::CODE] = 0;
    set_be16(b, field::CHECKSUM, 0);
    b[field::ND_RESERVED].copy_from_slice(&word);
    b[field::TARGET].copy_from_slice(target);
    let opt = &mut b[field::LL_OPTION];
    opt[0] = kind;
    opt[1] = 1;
    opt[2..].copy_from_slice(&mac.0);
    Ok(ND_WITH_LL_LEN)
}

/// Writes a neighbour advertisement for `target` with the given
/// [`na_flags`] (other bits cleared) and a target link-layer address option
/// carrying `target_ll` into the start of `buf`, with a zero checksum: the
/// caller fills it in with [`Packet::fill_checksum`] or
/// [`checksum::icmpv6`] once the IPv6 addresses are known. Returns the
/// message length, [`ND_WITH_LL_LEN`], or [`Error::Truncated`] if `buf` is
/// shorter than that (nothing is written then).
///
/// A reply to a solicitation sets [`na_flags::SOLICITED`] and, for an
/// address this host owns, [`na_flags::OVERRIDE`] (RFC 4861 section 7.2.4).
#[inline]
pub fn emit_neighbor_advertisement(
    buf: &mut [u8],
    flags: u8,
    target: &[u8; 16],
    target_ll: EthernetAddress,
) -> Result<usize> {
    let flags = flags & (na_flags::ROUTER | na_flags::SOLICITED | na_flags::OVERRIDE);
    emit_nd(
        buf,
        message::NEIGHBOR_ADVERTISEMENT,
        [flags, 0, 0, 0],
        target,
        ndp_option::TARGET_LINK_LAYER_ADDR,
        target_ll,
    )
}

/// Writes a neighbour solicitation for `target` with a source link-layer
/// address option carrying `source_ll` into the start of `buf`, with a zero
/// checksum for the caller to fill in (see
/// [`emit_neighbor_advertisement`]). Returns [`ND_WITH_LL_LEN`], or
/// [`Error::Truncated`] if `buf` is shorter (nothing is written then).
///
/// The option must be left out when the IPv6 source is the unspecified
/// address (duplicate address detection); this builder is for solicitations
/// from an assigned address, sent to
/// [`solicited_node_multicast`](super::ipv6::solicited_node_multicast) of
/// the target or to the target itself.
#[inline]
pub fn emit_neighbor_solicitation(buf: &mut [u8], target: &[u8; 16], source_ll: EthernetAddress) -> Result<usize> {
    emit_nd(buf, message::NEIGHBOR_SOLICITATION, [0; 4], target, ndp_option::SOURCE_LINK_LAYER_ADDR, source_ll)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::icmpv6::{Icmpv6Payload, Icmpv6PayloadSlice, NdpOptionSlice, NeighborAdvertisementHeader};
    use etherparse::{Icmpv6Header, Icmpv6Slice, Icmpv6Type};

    // 2001:db8::1 (us) and 2001:db8::2 (the neighbour).
    const SRC: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const MAC: EthernetAddress = EthernetAddress([0x02, 0x00, 0x5e, 0x10, 0x20, 0x30]);

    /// An ICMPv6 message built by etherparse, checksum filled in.
    fn build(t: Icmpv6Type, payload: &[u8]) -> Vec<u8> {
        let h = Icmpv6Header::with_checksum(t, SRC, DST, payload).unwrap();
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn echo_matches_etherparse() {
        for (t, ty) in [
            (Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 0xbeef, seq: 3 }), message::ECHO_REQUEST),
            (Icmpv6Type::EchoReply(etherparse::IcmpEchoHeader { id: 0xbeef, seq: 3 }), message::ECHO_REPLY),
        ] {
            let v = build(t, b"abcdefg");
            let p = Packet::new_checked(&v[..]).unwrap();
            let e = Icmpv6Slice::from_slice(&v).unwrap();
            assert_eq!(p.msg_type(), ty);
            assert_eq!(p.msg_type(), e.type_u8());
            assert_eq!(p.code(), e.code_u8());
            assert_eq!(p.checksum(), e.checksum());
            assert_eq!(p.echo_ident(), 0xbeef);
            assert_eq!(p.echo_seq(), 3);
            assert!(p.verify_checksum(&SRC, &DST));
            assert!(!p.verify_checksum(&DST, &[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]));
            assert_eq!(p.ndp_options().count(), 0);
            assert_eq!(p.target_addr(), None);
        }
    }

    #[test]
    fn echo_reply_rewrite() {
        let mut v = build(Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 2 }), b"xyz");
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_type_code(message::ECHO_REPLY, 0);
        assert!(p.verify_checksum(&SRC, &DST));
        let e = Icmpv6Slice::from_slice(&v).unwrap();
        assert!(matches!(e.icmp_type(), Icmpv6Type::EchoReply(_)));
        assert!(e.is_checksum_valid(SRC, DST));
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.fill_checksum(&DST, &SRC);
        assert!(Icmpv6Slice::from_slice(&v).unwrap().is_checksum_valid(DST, SRC));
    }

    #[test]
    fn errors_match_etherparse() {
        let v = build(Icmpv6Type::PacketTooBig { mtu: 1280 }, &[0x60; 48]);
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.msg_type(), message::PACKET_TOO_BIG);
        assert_eq!(p.mtu(), 1280);
        assert!(p.verify_checksum(&SRC, &DST));
        let cases = [
            (Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port), 1, 4),
            (Icmpv6Type::TimeExceeded(etherparse::icmpv6::TimeExceededCode::HopLimitExceeded), 3, 0),
            (
                Icmpv6Type::ParameterProblem(etherparse::icmpv6::ParameterProblemHeader {
                    code: etherparse::icmpv6::ParameterProblemCode::UnrecognizedNextHeader,
                    pointer: 6,
                }),
                4,
                1,
            ),
        ];
        for (t, ty, code) in cases {
            let v = build(t, &[0x60; 48]);
            let p = Packet::new_checked(&v[..]).unwrap();
            assert_eq!((p.msg_type(), p.code()), (ty, code));
            assert_eq!(ty, t.type_u8());
            assert!(p.verify_checksum(&SRC, &DST));
        }
        assert_eq!(message::DEST_UNREACHABLE, etherparse::icmpv6::TYPE_DST_UNREACH);
        assert_eq!(message::TIME_EXCEEDED, etherparse::icmpv6::TYPE_TIME_EXCEEDED);
        assert_eq!(message::PARAMETER_PROBLEM, etherparse::icmpv6::TYPE_PARAMETER_PROBLEM);
        assert_eq!(message::ROUTER_SOLICITATION, etherparse::icmpv6::TYPE_ROUTER_SOLICITATION);
        assert_eq!(message::ROUTER_ADVERTISEMENT, etherparse::icmpv6::TYPE_ROUTER_ADVERTISEMENT);
        assert_eq!(message::NEIGHBOR_SOLICITATION, etherparse::icmpv6::TYPE_NEIGHBOR_SOLICITATION);
        assert_eq!(message::NEIGHBOR_ADVERTISEMENT, etherparse::icmpv6::TYPE_NEIGHBOR_ADVERTISEMENT);
        assert_eq!(message::REDIRECT, etherparse::icmpv6::TYPE_REDIRECT_MESSAGE);
    }

    /// A target address followed by `opts`.
    fn nd_payload(opts: &[u8]) -> Vec<u8> {
        let mut v = DST.to_vec();
        v.extend_from_slice(opts);
        v
    }

    #[test]
    fn neighbor_advertisement_matches_etherparse() {
        for (r, s, o) in [(false, true, true), (true, false, false), (true, true, true), (false, false, true)] {
            let t = Icmpv6Type::NeighborAdvertisement(NeighborAdvertisementHeader {
                router: r,
                solicited: s,
                r#override: o,
            });
            let v = build(t, &nd_payload(&[2, 1, 0x02, 0x00, 0x5e, 0x10, 0x20, 0x30]));
            let p = Packet::new_checked(&v[..]).unwrap();
            assert_eq!(p.msg_type(), message::NEIGHBOR_ADVERTISEMENT);
            assert_eq!((p.na_router(), p.na_solicited(), p.na_override()), (r, s, o));
            assert_eq!(p.target_addr(), Some(DST));
            assert_eq!(p.target_link_addr(), Ok(Some(MAC)));
            assert_eq!(p.source_link_addr(), Ok(None));
            assert!(p.verify_checksum(&SRC, &DST));
            let e = Icmpv6Slice::from_slice(&v).unwrap();
            let Ok(Icmpv6PayloadSlice::NeighborAdvertisement(na)) = e.payload_slice() else { panic!() };
            assert_eq!(p.target_addr().map(core::net::Ipv6Addr::from), Some(na.target_address()));
            let opts: Vec<_> = na.options_iterator().collect();
            let Ok(NdpOptionSlice::TargetLinkLayerAddress(ref tll)) = opts[0] else { panic!() };
            assert_eq!(tll.link_layer_address(), &MAC.0);
        }
    }

    #[test]
    fn neighbor_solicitation_options() {
        // A nonce option (type 14, 8 bytes) before the source link-layer
        // address, and an unknown 16-byte option after it.
        let mut opts = vec![14, 1, 1, 2, 3, 4, 5, 6, 1, 1, 0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];
        opts.extend_from_slice(&[200, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let v = build(Icmpv6Type::NeighborSolicitation, &nd_payload(&opts));
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.target_addr(), Some(DST));
        assert_eq!(p.source_link_addr(), Ok(Some(MAC)));
        assert_eq!(p.target_link_addr(), Ok(None));
        let ours: Vec<_> = p.ndp_options().map(|o| o.unwrap()).collect();
        assert_eq!(ours.iter().map(|o| (o.kind(), o.bytes().len())).collect::<Vec<_>>(), [(14, 8), (1, 8), (200, 16)]);
        assert_eq!(ours[0].link_layer_addr(), None);
        let e = Icmpv6Slice::from_slice(&v).unwrap();
        let Ok(Icmpv6PayloadSlice::NeighborSolicitation(ns)) = e.payload_slice() else { panic!() };
        let theirs: Vec<_> = ns.options_iterator().map(|o| o.unwrap().as_bytes()).collect();
        assert_eq!(ours.iter().map(|o| o.bytes()).collect::<Vec<_>>(), theirs);
    }

    #[test]
    fn link_layer_option_of_other_length_is_not_a_mac() {
        // A source link-layer option of length 2 (not Ethernet) is skipped.
        let opts = [1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let v = build(Icmpv6Type::NeighborSolicitation, &nd_payload(&opts));
        assert_eq!(Packet::new_checked(&v[..]).unwrap().source_link_addr(), Ok(None));
    }

    #[test]
    fn ndp_option_errors() {
        // Length 0: rejected at once, not looped on.
        let v = build(Icmpv6Type::NeighborSolicitation, &nd_payload(&[1, 0, 0, 0, 0, 0, 0, 0]));
        let p = Packet::new_checked(&v[..]).unwrap();
        let all: Vec<_> = p.ndp_options().collect();
        assert_eq!(all, [Err(NdpError::ZeroLength)]);
        assert_eq!(p.source_link_addr(), Err(NdpError::ZeroLength));
        let e = Icmpv6Slice::from_slice(&v).unwrap();
        let Ok(Icmpv6PayloadSlice::NeighborSolicitation(ns)) = e.payload_slice() else { panic!() };
        assert!(ns.options_iterator().next().unwrap().is_err());
        // Length 0 after a good option.
        let mut opts = vec![2, 1, 0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];
        opts.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        let all: Vec<_> = NdpOptions::new(&opts).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1], Err(NdpError::ZeroLength));
        // Truncated at every byte of two options.
        let opts = [1u8, 1, 2, 0, 0x5e, 0, 0, 1, 200, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for n in 1..opts.len() {
            let last = NdpOptions::new(&opts[..n]).last().unwrap();
            let want = if n == 8 { Ok(()) } else { Err(NdpError::Truncated) };
            assert_eq!(last.map(|_| ()), want, "len {n}");
        }
        assert_eq!(NdpOptions::new(&opts).count(), 2);
        // A solicitation too short for its target.
        let p = Packet::new_checked(&[135u8, 0, 0, 0, 0, 0, 0, 0, 0x20][..]).unwrap();
        assert_eq!(p.target_addr(), None);
        assert_eq!(p.ndp_options().collect::<Vec<_>>(), [Err(NdpError::Truncated)]);
        assert_eq!(p.source_link_addr(), Err(NdpError::Truncated));
        assert_eq!(Error::from(NdpError::Truncated), Error::Truncated);
        assert_eq!(Error::from(NdpError::ZeroLength), Error::Malformed);
    }

    #[test]
    fn ndp_options_bounded() {
        let one = [14u8, 1, 0, 0, 0, 0, 0, 0];
        let opts: Vec<u8> = one.iter().copied().cycle().take(8 * MAX_NDP_OPTIONS).collect();
        assert!(NdpOptions::new(&opts).all(|o| o.is_ok()));
        assert_eq!(NdpOptions::new(&opts).count(), MAX_NDP_OPTIONS);
        // 200 options: MAX_NDP_OPTIONS of them, then one error, then the end.
        let opts: Vec<u8> = one.iter().copied().cycle().take(8 * 200).collect();
        let all: Vec<_> = NdpOptions::new(&opts).collect();
        assert_eq!(all.len(), MAX_NDP_OPTIONS + 1);
        assert_eq!(all[MAX_NDP_OPTIONS], Err(NdpError::TooMany));
        // A link-layer address option after the bound is not found.
        let mut opts = opts;
        opts.extend_from_slice(&[1, 1, 0x02, 0x00, 0x5e, 0x10, 0x20, 0x30]);
        let v = build(Icmpv6Type::NeighborSolicitation, &nd_payload(&opts));
        assert_eq!(Packet::new_checked(&v[..]).unwrap().source_link_addr(), Err(NdpError::TooMany));
    }

    #[test]
    fn options_offset_by_type() {
        assert_eq!(ndp_options_offset(message::ROUTER_SOLICITATION), Some(8));
        assert_eq!(ndp_options_offset(message::ROUTER_ADVERTISEMENT), Some(16));
        assert_eq!(ndp_options_offset(message::REDIRECT), Some(40));
        assert_eq!(ndp_options_offset(message::ECHO_REQUEST), None);
        // A router solicitation with a source link-layer address option.
        let v = build(Icmpv6Type::RouterSolicitation, &[1, 1, 0x02, 0x00, 0x5e, 0x10, 0x20, 0x30]);
        assert_eq!(Packet::new_checked(&v[..]).unwrap().source_link_addr(), Ok(Some(MAC)));
    }

    #[test]
    fn emit_neighbor_advertisement_matches_etherparse() {
        let mut buf = [0xaau8; 40];
        let n = emit_neighbor_advertisement(&mut buf, na_flags::SOLICITED | na_flags::OVERRIDE | 0x1f, &SRC, MAC);
        assert_eq!(n, Ok(ND_WITH_LL_LEN));
        assert_eq!(buf[n.unwrap()..], [0xaa; 8]);
        let mut p = Packet::new_checked(&mut buf[..ND_WITH_LL_LEN]).unwrap();
        assert_eq!(p.checksum(), 0);
        p.fill_checksum(&SRC, &DST);
        let c = p.checksum();
        assert_eq!(
            c,
            checksum::icmpv6(&SRC, &DST, &{
                let mut z = buf[..ND_WITH_LL_LEN].to_vec();
                z[2..4].fill(0);
                z
            })
        );
        let msg = &buf[..ND_WITH_LL_LEN];
        let e = Icmpv6Slice::from_slice(msg).unwrap();
        assert!(e.is_checksum_valid(SRC, DST));
        let Icmpv6Type::NeighborAdvertisement(h) = e.icmp_type() else { panic!() };
        assert_eq!((h.router, h.solicited, h.r#override), (false, true, true));
        let Some((Icmpv6Payload::NeighborAdvertisement(na), _)) = e.payload_slice().unwrap().to_payload() else {
            panic!()
        };
        assert_eq!(na.target_address, core::net::Ipv6Addr::from(SRC));
        // Rebuilt by etherparse from the same fields: the same bytes.
        let mut opt = vec![2, 1];
        opt.extend_from_slice(&MAC.0);
        assert_eq!(msg, build(e.icmp_type(), &[&SRC[..], &opt].concat()));
        let p = Packet::new_checked(msg).unwrap();
        assert_eq!(p.target_link_addr(), Ok(Some(MAC)));
        assert!(p.na_solicited() && p.na_override() && !p.na_router());
        // Too small a buffer: an error, nothing written.
        let mut small = [0u8; ND_WITH_LL_LEN - 1];
        assert_eq!(emit_neighbor_advertisement(&mut small, 0, &SRC, MAC), Err(Error::Truncated));
        assert_eq!(small, [0u8; ND_WITH_LL_LEN - 1]);
    }

    #[test]
    fn emit_neighbor_solicitation_matches_etherparse() {
        let target = DST;
        let mut buf = [0xaau8; ND_WITH_LL_LEN];
        assert_eq!(emit_neighbor_solicitation(&mut buf, &target, MAC), Ok(ND_WITH_LL_LEN));
        let sn = super::super::ipv6::solicited_node_multicast(&target);
        Packet::new_checked(&mut buf[..]).unwrap().fill_checksum(&SRC, &sn);
        let e = Icmpv6Slice::from_slice(&buf).unwrap();
        assert!(matches!(e.icmp_type(), Icmpv6Type::NeighborSolicitation));
        assert!(e.is_checksum_valid(SRC, sn));
        let Ok(Icmpv6PayloadSlice::NeighborSolicitation(ns)) = e.payload_slice() else { panic!() };
        assert_eq!(ns.target_address(), core::net::Ipv6Addr::from(target));
        let Some(Ok(NdpOptionSlice::SourceLinkLayerAddress(sll))) = ns.options_iterator().next() else { panic!() };
        assert_eq!(sll.link_layer_address(), &MAC.0);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.source_link_addr(), Ok(Some(MAC)));
        assert_eq!(p.target_addr(), Some(target));
        assert_eq!(buf[4..8], [0; 4]);
        assert_eq!(emit_neighbor_solicitation(&mut [0u8; 8], &target, MAC), Err(Error::Truncated));
    }

    #[test]
    fn truncated() {
        for n in 0..HEADER_LEN {
            assert_eq!(Packet::new_checked(&[135u8; 8][..n]).unwrap_err(), Error::Truncated);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..120)) {
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.msg_type(), p.code(), p.checksum(), p.echo_ident(), p.echo_seq(), p.mtu());
                let _ = (p.na_router(), p.na_solicited(), p.na_override(), p.target_addr());
                let _ = (p.source_link_addr(), p.target_link_addr(), p.verify_checksum(&SRC, &DST));
                proptest::prop_assert!(p.ndp_options().count() <= MAX_NDP_OPTIONS + 1);
            }
        }

        #[test]
        fn ndp_options_terminate(
            kind in proptest::num::u8::ANY,
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
        ) {
            // As an NS (options at 24) and as raw options.
            let mut msg = vec![135, 0, 0, 0];
            msg.extend_from_slice(&data);
            let p = Packet::new_unchecked(&msg[..]);
            let mut total = 0;
            for o in p.ndp_options().chain(NdpOptions::new(&data)) {
                total += 1;
                if let Ok(o) = o {
                    proptest::prop_assert!(o.bytes().len() >= 8 && o.bytes().len() % 8 == 0);
                    if o.link_layer_addr().is_some() {
                        proptest::prop_assert!(o.kind() == 1 || o.kind() == 2);
                    }
                }
            }
            proptest::prop_assert!(total <= 2 * (MAX_NDP_OPTIONS + 1));
            let _ = ndp_options_offset(kind);
        }
    }
}
