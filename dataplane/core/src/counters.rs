//! Per-worker counters.
//!
//! Each worker owns one [`WorkerCounters`] and is its only writer; the control
//! plane reads it at any time. Updates are a relaxed load and a relaxed store
//! (plain `mov`/`add` on x86-64, no locked read-modify-write), which is exact
//! because there is a single writer. The struct is cache-line aligned so two
//! workers never share a line.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why the dataplane dropped a packet. Every drop is counted under exactly one
/// reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Truncated or inconsistent headers, or a bad IPv4 header checksum.
    Malformed = 0,
    /// An EtherType, IP protocol or IP feature the fast path does not handle
    /// (IPv6, VLAN tags, ARP operations other than request and reply).
    Unsupported,
    /// An IPv4 fragment the gateway does not translate: of an ICMP message
    /// or of a protocol other than TCP and UDP, not for the gateway itself.
    Fragment,
    /// TTL would reach zero, and the packet got no ICMP time exceeded (over
    /// the worker's rate of ICMP errors, or no headroom for it).
    TtlExceeded,
    /// Addressed to a VIP on a port and protocol no service listens on.
    NoService,
    /// The service has no backend that can take new flows.
    NoBackend,
    /// Neither for a VIP, nor for the gateway, nor a reply from a backend.
    NoMatch,
    /// Addressed to the gateway itself, not something the fast path
    /// answers, and the ingress port has no kernel interface to punt it to
    /// (`kernel_interface = ""`).
    Local,
    /// No route to the destination.
    NoRoute,
    /// The next hop's MAC address is not known yet (resolution was started).
    NoNeighbour,
    /// An ARP packet that is not for one of our addresses.
    ArpNotOurs,
    /// The transmit queue was full.
    TxFull,
    /// A new FullNAT flow found no free source port on this worker's slice
    /// of its pool (the flow is not created; the client retries).
    SnatExhausted,
    /// A reply to a FullNAT source address and port that no flow holds (or
    /// from another backend than the flow's): FullNAT cannot translate it
    /// without the flow.
    NoFlow,
    /// The hand-off ring to the worker owning the packet's flow was full, or
    /// the dataplane stopped while the packet waited in it.
    Handoff,
    /// Direct server return needs 20 bytes in front of the frame for the
    /// outer IPv4 header, and the driver gave fewer.
    NoHeadroom,
    /// A packet without DF that would exceed the egress port's MTU once
    /// encapsulated (DSR; vipgate does not fragment). With DF set the
    /// client gets ICMP "fragmentation needed" instead (`icmp_frag_needed`).
    TooBig,
    /// A packet for the kernel (the exception path) found the worker's ring
    /// to the kernel interfaces full: the kernel side is not keeping up, and
    /// the fast path does not wait for it.
    PuntFull,
    /// A unicast frame addressed to another host's MAC, not the ingress
    /// port's: a switch or bridge flooded it here (after forgetting where
    /// that MAC is, or acting as a hub). Dropped before anything else looks
    /// at it: not forwarded, not answered, not punted.
    OtherHost,
    /// A source address no real client can have (RFC 1812, 5.3.7): 0/8,
    /// 127/8, multicast, class E, the limited broadcast, a directed
    /// broadcast of a port's subnet, a gateway address or a VIP. Dropped
    /// before any flow is created.
    MartianSource,
    /// A TCP segment whose flags no connection can carry (SYN+FIN, SYN+RST,
    /// no flags at all, FIN without ACK). Dropped before any flow is
    /// created.
    BadTcpFlags,
    /// A new flow over its service's limit of new flows per client source
    /// (`new_flow_limit`).
    RateLimited,
    /// A packet to a service from a client address outside the service's
    /// source list (`source_ranges`), tracked flow or not. Dropped before
    /// any flow is created.
    SourceDenied,
    /// An ICMP destination unreachable or time exceeded, not for the
    /// gateway itself, that quotes no flow the gateway translated (or no
    /// TCP or UDP packet with its ports).
    IcmpNoFlow,
    /// An 802.1Q or 802.1ad tagged frame for a VLAN no port carries, or
    /// with stacked tags (no port carries a VLAN yet).
    UnknownVlan,
    /// A datagram's first fragment found no room in the worker's fragment
    /// table (a flood of first fragments fills it until its entries lapse):
    /// its later fragments could not follow it, so it is not translated.
    FragmentTableFull,
    /// A later fragment that came before its first found the worker's
    /// store of waiting fragments full (count or bytes), or is longer than
    /// a 9000-byte MTU's frame.
    FragmentHoldFull,
    /// A frame the driver received into a chain of mbufs: the pipeline
    /// reads a frame's first segment only, so it is dropped before it is
    /// parsed. Never expected: the mbufs hold the largest port's frames and
    /// no port is set up to scatter.
    MultiSegment,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 28;
    /// Every reason, in counter order.
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::Unsupported,
        DropReason::Fragment,
        DropReason::TtlExceeded,
        DropReason::NoService,
        DropReason::NoBackend,
        DropReason::NoMatch,
        DropReason::Local,
        DropReason::NoRoute,
        DropReason::NoNeighbour,
        DropReason::ArpNotOurs,
        DropReason::TxFull,
        DropReason::SnatExhausted,
        DropReason::NoFlow,
        DropReason::Handoff,
        DropReason::NoHeadroom,
        DropReason::TooBig,
        DropReason::PuntFull,
        DropReason::OtherHost,
        DropReason::MartianSource,
        DropReason::BadTcpFlags,
        DropReason::RateLimited,
        DropReason::SourceDenied,
        DropReason::IcmpNoFlow,
        DropReason::UnknownVlan,
        DropReason::FragmentTableFull,
        DropReason::FragmentHoldFull,
        DropReason::MultiSegment,
    ];

    /// Stable snake_case name used in the API and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Unsupported => "unsupported",
            DropReason::Fragment => "fragment",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::NoService => "no_service",
            DropReason::NoBackend => "no_backend",
            DropReason::NoMatch => "no_match",
            DropReason::Local => "local",
            DropReason::NoRoute => "no_route",
            DropReason::NoNeighbour => "no_neighbour",
            DropReason::ArpNotOurs => "arp_not_ours",
            DropReason::TxFull => "tx_full",
            DropReason::SnatExhausted => "snat_exhausted",
            DropReason::NoFlow => "no_flow",
            DropReason::Handoff => "handoff",
            DropReason::NoHeadroom => "no_headroom",
            DropReason::TooBig => "too_big",
            DropReason::PuntFull => "punt_full",
            DropReason::OtherHost => "other_host",
            DropReason::MartianSource => "martian_source",
            DropReason::BadTcpFlags => "bad_tcp_flags",
            DropReason::RateLimited => "rate_limited",
            DropReason::SourceDenied => "source_denied",
            DropReason::IcmpNoFlow => "icmp_no_flow",
            DropReason::UnknownVlan => "unknown_vlan",
            DropReason::FragmentTableFull => "fragment_table_full",
            DropReason::FragmentHoldFull => "fragment_hold_full",
            DropReason::MultiSegment => "multi_segment",
        }
    }
}

/// One single-writer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker may call this.
    #[inline(always)]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Sets the value (for gauges). Only the owning worker may call this.
    #[inline(always)]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    /// Adds one. Only the owning worker may call this.
    #[inline(always)]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Current value; callable from any thread.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The counters of one worker.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerCounters {
    /// Packets received from all ports.
    pub rx_packets: Counter,
    /// Bytes received from all ports.
    pub rx_bytes: Counter,
    /// Packets handed to a port for transmission and accepted by it.
    pub tx_packets: Counter,
    /// Bytes of `tx_packets`.
    pub tx_bytes: Counter,
    /// Packets sent towards a backend (VIP -> backend: translated, or
    /// encapsulated for DSR); counted when rewritten, before the transmit
    /// queue accepts them.
    pub nat_forward: Counter,
    /// Packets translated back from a backend (backend -> VIP).
    pub nat_reverse: Counter,
    /// ARP replies built for our addresses and VIPs.
    pub arp_replies: Counter,
    /// ARP requests built to resolve next hops (a request the transmit queue
    /// refuses is also counted under the `tx_full` drop).
    pub arp_requests: Counter,
    /// ICMP echo replies built for our addresses and VIPs.
    pub icmp_echo_replies: Counter,
    /// ICMP "fragmentation needed" sent to clients whose DSR packet (DF
    /// set) would exceed the egress MTU once encapsulated (RFC 1191).
    pub icmp_frag_needed: Counter,
    /// ICMP "time exceeded" sent from a port address to the sender of a
    /// packet to translate whose TTL would reach 0 (traceroute through
    /// the gateway); within the worker's rate, the others are dropped as
    /// `ttl_exceeded`.
    pub icmp_time_exceeded: Counter,
    /// ICMP errors (destination unreachable, time exceeded) quoting a flow
    /// the gateway translated, translated and sent to the flow's other end
    /// (to the backend: path MTU discovery through nat and fullnat).
    pub icmp_errors_forwarded: Counter,
    /// Later fragments of a datagram translated from the fragment table, as
    /// its first fragment was (each also counts in `nat_forward` or
    /// `nat_reverse`).
    pub fragments_forwarded: Counter,
    /// Later fragments that came before their first and were copied to
    /// wait for it (each also counts in `consumed`).
    pub fragments_held: Counter,
    /// Waiting fragments sent once their first was translated (each also
    /// counts in `nat_forward` or `nat_reverse`, then in `tx_packets` or a
    /// transmit drop).
    pub fragments_released: Counter,
    /// Waiting fragments freed unsent: their first did not come within the
    /// timeout, or their rewrite failed (TTL, MTU).
    pub fragments_discarded: Counter,
    /// Packets absorbed without forwarding or dropping (ARP replies for us
    /// on a port without a kernel interface, fragments held for their
    /// first).
    /// Every packet is accounted for: rx + arp_requests +
    /// fragments_released + handoff_in + from_kernel = tx + drops +
    /// consumed + handoff_out + to_kernel per worker, where arp_requests and
    /// fragments_released are the packets the worker itself sends (built,
    /// or held earlier) and from_kernel those the kernel sends through it;
    /// summed over the workers the hand-offs cancel out.
    pub consumed: Counter,
    /// Packets punted to the kernel (the exception path): accepted by the
    /// worker's ring to the kernel interfaces.
    pub to_kernel: Counter,
    /// Bytes of `to_kernel`.
    pub to_kernel_bytes: Counter,
    /// The part of `to_kernel` that were control protocols (ARP, BGP, BFD,
    /// OSPF, VRRP, IPv6 neighbour discovery), passed on a ring of their own
    /// so that other punted traffic cannot crowd them out.
    pub to_kernel_control: Counter,
    /// Packets the kernel sent out of a port's kernel interface that this
    /// worker took from its ring, to transmit on the port (each then counts
    /// in `tx_packets` or as a `tx_full` drop).
    pub from_kernel: Counter,
    /// Bytes of `from_kernel`.
    pub from_kernel_bytes: Counter,
    /// Packets received here whose flow another worker owns, handed to it
    /// on its hand-off ring.
    pub handoff_out: Counter,
    /// Packets taken from other workers' hand-off rings.
    pub handoff_in: Counter,
    /// Flows added to the connection-tracking table.
    pub flows_created: Counter,
    /// Live flows pushed out of a full connection-tracking table to make
    /// room for a new one (the new flow is still forwarded).
    pub flows_evicted: Counter,
    /// Flows whose backend left its service and that were moved to a live
    /// backend chosen by Maglev.
    pub flows_rehashed: Counter,
    /// TCP resets sent to clients whose flow's backend left a service with
    /// `on_backend_removal = "reset"`.
    pub flows_reset: Counter,
    /// Occupied connection-tracking slots (a gauge, updated by housekeeping;
    /// an upper bound on live flows: expired ones are counted until swept).
    pub flows_active: Counter,
    /// Loop iterations that received at least one packet.
    pub busy_polls: Counter,
    /// TSC cycles spent in busy iterations (rx through tx).
    pub busy_cycles: Counter,
    /// Drops, indexed by `DropReason as usize`.
    pub drops: [Counter; DropReason::COUNT],
}

impl WorkerCounters {
    /// Counts one drop.
    #[inline(always)]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].inc();
    }

    /// Drops counted under `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].get()
    }

    /// Sum of all drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(Counter::get).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_reason_in_index_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        let names: std::collections::HashSet<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), DropReason::COUNT);
    }

    #[test]
    fn counters_are_cache_line_aligned() {
        assert_eq!(core::mem::align_of::<WorkerCounters>(), 64);
    }
}
