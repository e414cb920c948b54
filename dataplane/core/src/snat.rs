//! FullNAT source addresses and ports: one worker's share of every source
//! pool, which of its ports are free, and the way back from a reply to the
//! flow it belongs to.
//!
//! Owns: splitting a pool's port range between workers, allocating and
//! releasing (address, port) pairs, and the reverse index from a pair to the
//! client's view of the flow. Must not touch packets or the flow table.
//!
//! Each pool's range `first_port..=last_port` is cut into `workers` equal
//! slices; worker `w` owns slice `w` on every address of the pool (ports
//! past the last whole slice are left unused). So the worker that owns a
//! reply's flow is a division of the reply's destination port, with no
//! shared state, and a worker never hands out another worker's port.
//!
//! A pair belongs to one flow at a time (one client flow per source port,
//! whatever the backend), so the reverse index is a plain array indexed by
//! (address, port): a reply is matched with one bounds check and one load.
//! Free ports wait in a FIFO per address, so a released port is reused as
//! late as possible (a backend's TIME_WAIT for the old connection has the
//! longest time to end).

use crate::hash::FlowKey;
use crate::snapshot::SourcePoolSpec;
use ahash::RandomState;
use hashbrown::HashMap;

/// The slice of `pool`'s ports that worker `worker` of `workers` owns:
/// (first port, number of ports). Empty when the range has fewer ports than
/// there are workers.
#[must_use]
pub fn slice_of(pool: &SourcePoolSpec, worker: u16, workers: u16) -> (u16, u16) {
    let span = u32::from(pool.last_port.saturating_sub(pool.first_port)) + 1;
    let len = span / u32::from(workers.max(1));
    let first = u32::from(pool.first_port) + len * u32::from(worker);
    (first.min(u32::from(u16::MAX)) as u16, len as u16)
}

/// The worker of `workers` that owns source port `port` of `pool`, or
/// `None` if the port is outside every worker's slice.
#[inline]
#[must_use]
pub fn owner_of(pool: &SourcePoolSpec, port: u16, workers: u16) -> Option<u16> {
    if port < pool.first_port || port > pool.last_port {
        return None;
    }
    let span = u32::from(pool.last_port - pool.first_port) + 1;
    let len = span / u32::from(workers.max(1));
    if len == 0 {
        return None;
    }
    let w = u32::from(port - pool.first_port) / len;
    (w < u32::from(workers)).then_some(w as u16)
}

/// What a source (address, port) pair is bound to: the flow as the client
/// sees it and the backend it was sent to (a reply must come from there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// The client's flow: client address and port, VIP and port, protocol.
    pub key: FlowKey,
    /// The backend's address.
    pub backend_addr: u32,
    /// The backend's port.
    pub backend_port: u16,
    /// The backend's stats slot, to count replies under.
    pub stats: u32,
    /// False when the pair is free.
    pub live: bool,
}

/// The free ports of one address, oldest release first.
#[derive(Debug)]
struct FreePorts {
    ports: Box<[u16]>,
    head: usize,
    len: usize,
}

impl FreePorts {
    /// An empty list with room for `capacity` ports.
    fn with_capacity(capacity: u16) -> FreePorts {
        FreePorts { ports: vec![0; usize::from(capacity)].into_boxed_slice(), head: 0, len: 0 }
    }

    #[inline]
    fn pop(&mut self) -> Option<u16> {
        if self.len == 0 {
            return None;
        }
        let p = self.ports[self.head];
        self.head = if self.head + 1 == self.ports.len() { 0 } else { self.head + 1 };
        self.len -= 1;
        Some(p)
    }

    #[inline]
    fn push(&mut self, port: u16) {
        debug_assert!(self.len < self.ports.len());
        let mut tail = self.head + self.len;
        if tail >= self.ports.len() {
            tail -= self.ports.len();
        }
        self.ports[tail] = port;
        self.len += 1;
    }
}

/// One pool, as far as this worker is concerned.
#[derive(Debug)]
struct Pool {
    spec: SourcePoolSpec,
    /// This worker's slice: first port and length.
    first: u16,
    len: u16,
    /// Free ports, per address (indexed like `spec.addresses`).
    free: Vec<FreePorts>,
    /// Bindings, `len` per address.
    bindings: Box<[Binding]>,
}

impl Pool {
    #[inline]
    fn index(&self, addr_index: u16, port: u16) -> Option<usize> {
        let off = port.checked_sub(self.first)?;
        (off < self.len && usize::from(addr_index) < self.spec.addresses.len())
            .then(|| usize::from(addr_index) * usize::from(self.len) + usize::from(off))
    }
}

/// One worker's FullNAT source ports. See the module documentation.
#[derive(Debug)]
pub struct SnatTable {
    worker: u16,
    workers: u16,
    pools: Vec<Pool>,
    /// Pool address -> (pool index, address index), for releases.
    addresses: HashMap<u32, (u16, u16), RandomState>,
}

impl SnatTable {
    /// An empty table for worker `worker` of `workers` (no pools yet: see
    /// [`SnatTable::rebuild`]).
    #[must_use]
    pub fn new(worker: u16, workers: u16) -> SnatTable {
        SnatTable {
            worker,
            workers: workers.max(1),
            pools: Vec::new(),
            addresses: HashMap::with_hasher(RandomState::new()),
        }
    }

    /// True if the table was built for exactly these pools.
    #[must_use]
    pub fn built_for(&self, pools: &[SourcePoolSpec]) -> bool {
        self.pools.len() == pools.len() && self.pools.iter().zip(pools).all(|(p, s)| p.spec == *s)
    }

    /// True if the pair `(addr, port)` would be this worker's in `pools`.
    #[must_use]
    pub fn would_own(&self, pools: &[SourcePoolSpec], addr: u32, port: u16) -> bool {
        pools.iter().any(|p| p.addresses.contains(&addr) && owner_of(p, port, self.workers) == Some(self.worker))
    }

    /// Rebuilds the table for `pools` with every pair free except those in
    /// `claims` (pairs still held by tracked flows: address, port, binding).
    /// Claims for pairs this worker does not own are ignored. Allocates: for
    /// configuration changes, never per packet.
    pub fn rebuild(&mut self, pools: &[SourcePoolSpec], claims: &[(u32, u16, Binding)]) {
        self.addresses.clear();
        self.pools = pools
            .iter()
            .enumerate()
            .map(|(pi, spec)| {
                let (first, len) = slice_of(spec, self.worker, self.workers);
                for (ai, &a) in spec.addresses.iter().enumerate() {
                    self.addresses.insert(a, (pi as u16, ai as u16));
                }
                Pool {
                    spec: spec.clone(),
                    first,
                    len,
                    free: Vec::new(),
                    bindings: vec![Binding::default(); spec.addresses.len() * usize::from(len)].into_boxed_slice(),
                }
            })
            .collect();
        for &(addr, port, binding) in claims {
            if let Some(&(pi, ai)) = self.addresses.get(&addr) {
                let pool = &mut self.pools[usize::from(pi)];
                if let Some(i) = pool.index(ai, port) {
                    pool.bindings[i] = Binding { live: true, ..binding };
                }
            }
        }
        for pool in &mut self.pools {
            pool.free = (0..pool.spec.addresses.len())
                .map(|ai| {
                    let mut free = FreePorts::with_capacity(pool.len);
                    for off in 0..pool.len {
                        if !pool.bindings[ai * usize::from(pool.len) + usize::from(off)].live {
                            free.push(pool.first + off);
                        }
                    }
                    free
                })
                .collect();
        }
    }

    /// Takes a free pair from pool `pool` for `binding`'s flow, starting
    /// with the address `spread` selects (so flows spread over the pool's
    /// addresses) and trying the others when its ports are used up. `None`
    /// when every address is exhausted (or the pool is unknown).
    #[inline]
    pub fn allocate(&mut self, pool: u16, spread: u32, binding: Binding) -> Option<(u32, u16)> {
        let p = self.pools.get_mut(usize::from(pool))?;
        let n = p.free.len();
        if n == 0 {
            return None;
        }
        let start = ((u64::from(spread) * n as u64) >> 32) as usize;
        for k in 0..n {
            let ai = if start + k >= n { start + k - n } else { start + k };
            if let Some(port) = p.free[ai].pop() {
                let i = ai * usize::from(p.len) + usize::from(port - p.first);
                p.bindings[i] = Binding { live: true, ..binding };
                return Some((p.spec.addresses[ai], port));
            }
        }
        None
    }

    /// Frees the pair `(addr, port)`; nothing happens if it is not this
    /// worker's or not bound.
    pub fn release(&mut self, addr: u32, port: u16) {
        let Some(&(pi, ai)) = self.addresses.get(&addr) else { return };
        let pool = &mut self.pools[usize::from(pi)];
        if let Some(i) = pool.index(ai, port)
            && pool.bindings[i].live
        {
            pool.bindings[i].live = false;
            pool.free[usize::from(ai)].push(port);
        }
    }

    /// What the pair (address `addr_index` of pool `pool`, `port`) is bound
    /// to, if it is this worker's and in use.
    #[inline]
    #[must_use]
    pub fn binding(&self, pool: u16, addr_index: u16, port: u16) -> Option<&Binding> {
        let p = self.pools.get(usize::from(pool))?;
        let b = &p.bindings[p.index(addr_index, port)?];
        b.live.then_some(b)
    }

    /// Points a bound pair at another backend (its flow was moved).
    pub fn rebind(&mut self, addr: u32, port: u16, backend_addr: u32, backend_port: u16, stats: u32) {
        let Some(&(pi, ai)) = self.addresses.get(&addr) else { return };
        let pool = &mut self.pools[usize::from(pi)];
        if let Some(i) = pool.index(ai, port)
            && pool.bindings[i].live
        {
            pool.bindings[i].backend_addr = backend_addr;
            pool.bindings[i].backend_port = backend_port;
            pool.bindings[i].stats = stats;
        }
    }

    /// Free pairs of pool `pool` on this worker.
    #[must_use]
    pub fn free_pairs(&self, pool: u16) -> usize {
        self.pools.get(usize::from(pool)).map_or(0, |p| p.free.iter().map(|f| f.len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(first: u16, last: u16, addrs: &[u32]) -> SourcePoolSpec {
        SourcePoolSpec { name: "p".into(), addresses: addrs.to_vec(), first_port: first, last_port: last }
    }

    fn binding(i: u16) -> Binding {
        Binding {
            key: FlowKey { src_addr: 1, dst_addr: 2, src_port: i, dst_port: 80, protocol: 6 },
            backend_addr: 3,
            backend_port: 8080,
            stats: 0,
            live: false,
        }
    }

    #[test]
    fn slices_partition_the_range_and_owner_inverts_them() {
        let p = pool(1024, 65535, &[10]);
        for workers in 1..=7u16 {
            let mut seen = 0u32;
            for w in 0..workers {
                let (first, len) = slice_of(&p, w, workers);
                seen += u32::from(len);
                for port in [first, first + (len - 1)] {
                    assert_eq!(owner_of(&p, port, workers), Some(w), "workers {workers} port {port}");
                }
            }
            assert!(64512 - seen < u32::from(workers), "at most workers-1 ports unused");
            assert_eq!(owner_of(&p, 1023, workers), None);
        }
        assert_eq!(slice_of(&pool(100, 101, &[1]), 2, 3).1, 0, "fewer ports than workers: empty slices");
        assert_eq!(owner_of(&pool(100, 101, &[1]), 100, 3), None);
    }

    #[test]
    fn allocates_every_pair_once_then_reports_exhaustion() {
        let p = pool(2000, 2009, &[10, 11]);
        let mut t = SnatTable::new(1, 2);
        t.rebuild(std::slice::from_ref(&p), &[]);
        assert_eq!(t.free_pairs(0), 10);
        let mut got = std::collections::HashSet::new();
        for i in 0..10 {
            let (a, port) = t.allocate(0, i * 0x1999_9999, binding(i as u16)).expect("free pair");
            assert!((2005..=2009).contains(&port), "worker 1 owns the upper half: {port}");
            assert!(got.insert((a, port)));
        }
        assert_eq!(t.allocate(0, 0, binding(99)), None, "exhausted");
        let (a, port) = *got.iter().next().unwrap();
        t.release(a, port);
        t.release(a, port); // twice: no effect
        assert_eq!(t.free_pairs(0), 1);
        assert_eq!(t.allocate(0, 0, binding(7)), Some((a, port)));
    }

    #[test]
    fn bindings_are_found_by_pair_and_follow_rebinding_and_release() {
        let p = pool(3000, 3999, &[10]);
        let mut t = SnatTable::new(0, 1);
        t.rebuild(std::slice::from_ref(&p), &[]);
        let (a, port) = t.allocate(0, 0, binding(5)).unwrap();
        assert_eq!(t.binding(0, 0, port).map(|b| b.key.src_port), Some(5));
        t.rebind(a, port, 9, 9090, 7);
        assert_eq!(t.binding(0, 0, port).map(|b| (b.backend_addr, b.backend_port, b.stats)), Some((9, 9090, 7)));
        t.release(a, port);
        assert_eq!(t.binding(0, 0, port), None);
        assert_eq!(t.binding(0, 0, 2999), None, "outside the slice");
        assert_eq!(t.binding(0, 1, 3000), None, "no such address");
    }

    #[test]
    fn released_ports_are_reused_last() {
        let p = pool(5000, 5003, &[10]);
        let mut t = SnatTable::new(0, 1);
        t.rebuild(std::slice::from_ref(&p), &[]);
        let first = t.allocate(0, 0, binding(1)).unwrap();
        t.release(first.0, first.1);
        let order: Vec<u16> = (0..4).map(|i| t.allocate(0, 0, binding(i)).unwrap().1).collect();
        assert_eq!(order, vec![5001, 5002, 5003, 5000]);
    }

    #[test]
    fn rebuild_keeps_claimed_pairs_bound_and_out_of_the_free_list() {
        let p = pool(6000, 6007, &[10, 11]);
        let mut t = SnatTable::new(0, 2);
        let claims = [(11, 6002, binding(42)), (11, 6006, binding(43)), (99, 6000, binding(44))];
        t.rebuild(std::slice::from_ref(&p), &claims);
        assert!(t.built_for(std::slice::from_ref(&p)));
        assert_eq!(t.binding(0, 1, 6002).map(|b| b.key.src_port), Some(42));
        assert_eq!(t.binding(0, 1, 6006), None, "6006 is worker 1's");
        assert_eq!(t.free_pairs(0), 7);
        assert!(t.would_own(std::slice::from_ref(&p), 10, 6003));
        assert!(!t.would_own(std::slice::from_ref(&p), 10, 6004));
        for _ in 0..7 {
            let (a, port) = t.allocate(0, 0xFFFF_FFFF, binding(0)).unwrap();
            assert_ne!((a, port), (11, 6002));
        }
    }
}
