//! Wire formats: checked, zero-copy views over packet bytes.
//!
//! Each protocol module has a `Packet<T: AsRef<[u8]>>` (or `Frame`) view with
//! `new_unchecked`, `new_checked` and `check_len`. After `new_checked`
//! succeeds, no accessor of that view can panic or read out of bounds, so the
//! pipeline can parse untrusted frames with plain slice indexing. Setters
//! exist for the fields vipgate rewrites. Field offsets live in a `field`
//! module per protocol.
//!
//! Owns: byte layouts. Must not hold any load-balancing logic.

/// Declares a view type over a byte buffer: the struct, `new_unchecked`,
/// and `new_checked`, which wraps after the type's own `check_len`. The
/// attribute before `=>` goes on both constructors; the doc comment after
/// it on the struct.
macro_rules! view {
    (#[$inline:meta] => $(#[$attr:meta])* $name:ident) => {
        $(#[$attr])*
        #[derive(Debug, Clone)]
        pub struct $name<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// Wraps a buffer without checks.
            #[$inline]
            pub fn new_unchecked(buffer: T) -> Self {
                $name { buffer }
            }

            /// Wraps a buffer after [`check_len`](Self::check_len).
            #[$inline]
            pub fn new_checked(buffer: T) -> $crate::wire::Result<Self> {
                let view = Self::new_unchecked(buffer);
                view.check_len()?;
                Ok(view)
            }
        }
    };
}
use view;

pub mod arp;
pub mod ethernet;
pub mod icmp;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;
pub mod vlan;

pub use ethernet::{EtherType, EthernetAddress};

/// A byte range within a header.
pub(crate) type Field = core::ops::Range<usize>;

/// Why a view could not be made over some bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The buffer is shorter than the header or than a length field says.
    #[error("truncated")]
    Truncated,
    /// A field holds a value that makes the packet unusable (bad version,
    /// header length smaller than the minimum, inconsistent lengths).
    #[error("malformed")]
    Malformed,
}

/// Result of the wire parsers.
pub type Result<T> = core::result::Result<T, Error>;

#[inline(always)]
pub(crate) fn be16(b: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([b[f.start], b[f.start + 1]])
}

#[inline(always)]
pub(crate) fn be32(b: &[u8], f: Field) -> u32 {
    u32::from_be_bytes([b[f.start], b[f.start + 1], b[f.start + 2], b[f.start + 3]])
}

#[inline(always)]
pub(crate) fn set_be16(b: &mut [u8], f: Field, v: u16) {
    b[f.start..f.start + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
pub(crate) fn set_be32(b: &mut [u8], f: Field, v: u32) {
    b[f.start..f.start + 4].copy_from_slice(&v.to_be_bytes());
}
