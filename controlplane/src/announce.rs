//! Route announcement: the VIPs that can take new flows, as /32 addresses on
//! a local interface (`vipgate0` by default) from which the host's routing
//! daemon (FRR or BIRD) redistributes connected routes to the routers.
//!
//! Owns: that interface (created if missing, brought up, removed at a clean
//! shutdown) and the set of addresses on it; the hold-down that delays a
//! withdrawal; the definition of a VIP that may be announced
//! ([`eligibility`]); the withdrawal of every VIP while every uplink port
//! is down ([`on_interface`]; when that is the case is `link`'s rule). It must not touch any other interface, nor speak BGP:
//! the routing daemon does, with the network team's own configuration
//! (examples in `docs/examples/`).
//!
//! The kernel is driven over rtnetlink (the `rtnetlink` crate) rather than
//! by spawning `ip`: errors come back as errno values that can be told apart
//! (permission, unknown device type, exists), there is no dependency on the
//! iproute2 binary or its output format, and nothing forks from the DPDK
//! main lcore. Everything here runs on the control plane's current-thread
//! tokio runtime; nothing is on the packet path.
//!
//! Timing: a VIP that becomes eligible is added at once; one that stops
//! being eligible stays until it has been ineligible for the whole
//! `hold_down`, so a flapping backend does not make the routers churn. The
//! interface is compared with the wanted set after every change, on every
//! kernel notification about it or its addresses (a hand edit is repaired
//! at once) and every [`RESYNC_INTERVAL`] (which retries failed calls).
//! While every uplink is down nothing is announced, at once and without a
//! hold-down; the VIPs come back as soon as one uplink is up.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_channel::mpsc::UnboundedReceiver;
use futures_util::stream::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, MulticastGroup};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::config::announce_settings::{AnnounceSettings, InterfaceKind};
use crate::health::TargetKey;
use crate::state::{self, AdminState, DesiredState, ServiceState};

/// How often the interface is compared with the wanted set even when
/// nothing changed (a fallback: link and address notifications trigger a
/// comparison at once; this catches what they miss and retries failed
/// calls).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// Whether going from `old` to `new` needs another interface (on, off,
/// renamed or of another kind), rather than a new hold-down only.
fn interface_changes(old: &AnnounceSettings, new: &AnnounceSettings) -> bool {
    (old.enabled, &old.interface, old.kind) != (new.enabled, &new.interface, new.kind)
}

/// The kernel's link kind of `kind`.
fn info_kind(kind: InterfaceKind) -> InfoKind {
    match kind {
        InterfaceKind::Dummy => InfoKind::Dummy,
        InterfaceKind::Ifb => InfoKind::Ifb,
    }
}

/// One service's view for eligibility: its VIP and how many of its
/// backends can take new flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceBackends {
    /// The service's name.
    pub service: String,
    /// Its VIP.
    pub vip: Ipv4Addr,
    /// Its backends able to take new flows, as (address, port).
    pub taking_new_flows: Vec<(Ipv4Addr, u16)>,
}

/// Whether a backend can take new flows: administratively enabled, with a
/// weight above 0.
fn takes_new_flows(admin_state: AdminState, weight: u32) -> bool {
    admin_state == AdminState::Enabled && weight > 0
}

/// The one place that says which backends can take new flows, for every
/// service of the desired state (static services of `config` and dynamic
/// ones of `dynamic`, one model): enabled, a weight above 0, and not `down`
/// by its health check.
pub fn backends_taking_new_flows(
    config: &Config,
    dynamic: &DesiredState,
    down: &HashSet<TargetKey>,
) -> Vec<ServiceBackends> {
    state::all_services(config, dynamic).map(|s| service_backends(s, down)).collect()
}

fn healthy(down: &HashSet<TargetKey>, service: &str, address: Ipv4Addr, port: u16) -> bool {
    down.is_empty() || !down.contains(&TargetKey { service: service.to_owned(), address, port })
}

fn service_backends(s: &ServiceState, down: &HashSet<TargetKey>) -> ServiceBackends {
    ServiceBackends {
        service: s.name.clone(),
        vip: s.vip,
        taking_new_flows: s
            .backends
            .iter()
            .filter(|b| takes_new_flows(b.admin_state, b.weight))
            .map(|b| (b.address, b.port))
            .filter(|&(a, p)| healthy(down, &s.name, a, p))
            .collect(),
    }
}

/// [`eligibility`] kept up to date service by service, so that a change
/// costs what it touched: each service's VIP and whether it has a backend
/// that takes new flows, and per VIP how many of its services do.
#[derive(Clone, Debug, Default)]
pub struct Eligibility {
    services: HashMap<String, (Ipv4Addr, bool)>,
    /// Per VIP: its services, and those of them taking new flows.
    vips: BTreeMap<Ipv4Addr, (u32, u32)>,
}

impl Eligibility {
    /// The eligibility of the whole state.
    pub fn build(config: &Config, dynamic: &DesiredState, down: &HashSet<TargetKey>) -> Eligibility {
        let mut e = Eligibility::default();
        for s in backends_taking_new_flows(config, dynamic, down) {
            e.set(&s.service, Some((s.vip, !s.taking_new_flows.is_empty())));
        }
        e
    }

    /// Computes the services named `names` again (each static, dynamic, or
    /// gone). True if that changed [`Eligibility::map`]: a VIP came, went,
    /// or became eligible or not (most changes, a weight or a backend among
    /// others, change nothing there, and the announcer need not hear of
    /// them).
    pub fn refresh<'a>(
        &mut self,
        config: &Config,
        dynamic: &DesiredState,
        down: &HashSet<TargetKey>,
        names: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        // The VIPs the named services had and have, as `map` shows them
        // before and after.
        // A map, not a list: a whole-state change names every service.
        let mut touched: HashMap<Ipv4Addr, Option<bool>> = HashMap::new();
        for name in names {
            let entry = state::find_service(config, dynamic, name).map(|s| service_backends(s, down));
            let entry = entry.map(|s| (s.vip, !s.taking_new_flows.is_empty()));
            for vip in self.services.get(name).map(|e| e.0).into_iter().chain(entry.map(|e| e.0)) {
                touched.entry(vip).or_insert_with(|| self.eligible(vip));
            }
            self.set(name, entry);
        }
        touched.iter().any(|(&vip, &before)| self.eligible(vip) != before)
    }

    /// What [`Eligibility::map`] says of `vip`: `None` if it is no VIP.
    fn eligible(&self, vip: Ipv4Addr) -> Option<bool> {
        self.vips.get(&vip).map(|&(_, taking)| taking > 0)
    }

    fn set(&mut self, name: &str, entry: Option<(Ipv4Addr, bool)>) {
        if let Some((vip, taking)) = self.services.remove(name)
            && let Some(counts) = self.vips.get_mut(&vip)
        {
            counts.0 -= 1;
            counts.1 -= u32::from(taking);
            if counts.0 == 0 {
                self.vips.remove(&vip);
            }
        }
        if let Some((vip, taking)) = entry {
            let counts = self.vips.entry(vip).or_default();
            counts.0 += 1;
            counts.1 += u32::from(taking);
            self.services.insert(name.to_owned(), (vip, taking));
        }
    }

    /// Every VIP, and whether it may be announced.
    pub fn map(&self) -> BTreeMap<Ipv4Addr, bool> {
        self.vips.iter().map(|(vip, (_, taking))| (*vip, *taking > 0)).collect()
    }
}

/// Every VIP, and whether it may be announced: while at least one of its
/// services (several may share a VIP on different ports or protocols) has
/// at least one backend that can take new flows. A plain function of
/// [`backends_taking_new_flows`].
pub fn vip_eligibility(services: &[ServiceBackends]) -> BTreeMap<Ipv4Addr, bool> {
    let mut vips: BTreeMap<Ipv4Addr, bool> = BTreeMap::new();
    for s in services {
        *vips.entry(s.vip).or_default() |= !s.taking_new_flows.is_empty();
    }
    vips
}

/// [`vip_eligibility`] of [`backends_taking_new_flows`]: what the daemon
/// computes after every publication of the desired state
/// (`vipgate_daemon::Reloader::commit`), from the state just published.
pub fn eligibility(config: &Config, dynamic: &DesiredState, down: &HashSet<TargetKey>) -> BTreeMap<Ipv4Addr, bool> {
    vip_eligibility(&backends_taking_new_flows(config, dynamic, down))
}

/// The addresses to keep on the interface, with the hold-down applied.
/// Pure: time is passed in, so it is tested without a clock or a kernel.
#[derive(Debug, Default)]
pub struct Announcements {
    /// Wanted VIPs: `None` while eligible, `Some(since)` while held down
    /// after it stopped being eligible at `since`.
    wanted: BTreeMap<Ipv4Addr, Option<Instant>>,
}

impl Announcements {
    /// Takes a new eligibility at `now`: an eligible VIP is wanted at once
    /// (a pending withdrawal is cancelled); a wanted VIP that is no longer
    /// eligible (or no longer exists) starts its hold-down. Then expires
    /// what has been held down for `hold_down`.
    pub fn update(&mut self, now: Instant, eligibility: &BTreeMap<Ipv4Addr, bool>, hold_down: Duration) {
        for (vip, _) in eligibility.iter().filter(|(_, e)| **e) {
            self.wanted.insert(*vip, None);
        }
        for (vip, since) in &mut self.wanted {
            if since.is_none() && !eligibility.get(vip).copied().unwrap_or(false) {
                *since = Some(now);
            }
        }
        self.expire(now, hold_down);
    }

    /// Drops the VIPs held down for `hold_down` or longer.
    pub fn expire(&mut self, now: Instant, hold_down: Duration) {
        self.wanted.retain(|_, since| since.is_none_or(|t| now.saturating_duration_since(t) < hold_down));
    }

    /// The VIPs to have on the interface now.
    pub fn wanted(&self) -> BTreeSet<Ipv4Addr> {
        self.wanted.keys().copied().collect()
    }

    /// When the next held-down VIP expires, if any.
    pub fn next_expiry(&self, hold_down: Duration) -> Option<Instant> {
        self.wanted.values().flatten().map(|t| *t + hold_down).min()
    }

    /// Whether `vip` is wanted only because of its hold-down.
    pub fn held_down(&self, vip: Ipv4Addr) -> bool {
        matches!(self.wanted.get(&vip), Some(Some(_)))
    }
}

/// The VIPs to have on the interface: those `announcements` want, or none
/// while announcement is off or every uplink port is down
/// (`link::uplinks_down`). A link withdraws at once, without the hold-down:
/// with no link the gateway receives nothing, so a route kept for the
/// hold-down would only draw traffic into a dead end. The announcements
/// keep their state meanwhile, so when a link is back the VIPs are what
/// they would have been without the outage.
pub fn on_interface(announcements: &Announcements, enabled: bool, uplinks_down: bool) -> BTreeSet<Ipv4Addr> {
    if enabled && !uplinks_down { announcements.wanted() } else { BTreeSet::new() }
}

/// Why the announcer could not do its work. Each names the interface and
/// what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnnounceError {
    /// The netlink socket could not be opened.
    #[error("[announce]: cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    /// The kernel refused for lack of privilege.
    #[error(
        "[announce]: cannot {action} interface {interface:?}: permission denied (vipgated needs CAP_NET_ADMIN to manage it; run it as root or grant the capability, or set [announce] enabled = false)"
    )]
    Permission {
        /// What was attempted.
        action: &'static str,
        /// The interface.
        interface: String,
    },
    /// The name is taken by an interface of another kind.
    #[error(
        "[announce]: interface {interface:?} exists and is {found}, not of the configured kind {wanted:?}: vipgated only manages an interface of its own kind (remove or rename that interface, or set [announce] interface to another name)"
    )]
    WrongKind {
        /// The interface.
        interface: String,
        /// What it is (`a veth interface`, `a physical or unknown device`).
        found: String,
        /// The configured kind.
        wanted: &'static str,
    },
    /// The kernel does not know the kind.
    #[error(
        "[announce]: cannot create interface {interface:?}: this kernel has no {kind} driver (load it with 'modprobe {kind}'; a kernel built without CONFIG_DUMMY can use [announce] kind = \"ifb\")"
    )]
    NoDriver {
        /// The interface.
        interface: String,
        /// The configured kind.
        kind: &'static str,
    },
    /// Any other netlink failure.
    #[error("[announce]: cannot {action} interface {interface:?}: {source}")]
    Netlink {
        /// What was attempted.
        action: &'static str,
        /// The interface.
        interface: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
}

impl AnnounceError {
    fn netlink(action: &'static str, interface: &str, source: rtnetlink::Error) -> AnnounceError {
        let errno = match &source {
            rtnetlink::Error::NetlinkError(m) => m.raw_code().abs(),
            _ => 0,
        };
        if errno == libc_errno::EPERM || errno == libc_errno::EACCES {
            AnnounceError::Permission { action, interface: interface.to_owned() }
        } else {
            AnnounceError::Netlink { action, interface: interface.to_owned(), source }
        }
    }
}

/// The Linux errno values told apart (the kernel's numbering; no `libc`
/// dependency for three constants).
mod libc_errno {
    pub(super) const EPERM: i32 = 1;
    pub(super) const EACCES: i32 = 13;
    pub(super) const EOPNOTSUPP: i32 = 95;
}

/// Kernel notifications: link and IPv4 address changes in the namespace.
type Events = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, rtnetlink::sys::SocketAddr)>;

/// Opens an rtnetlink connection in the calling thread's network namespace,
/// subscribed to link and IPv4 address notifications; its I/O runs as a
/// task on the current tokio runtime.
fn connect() -> Result<(Handle, Events), AnnounceError> {
    let (connection, handle, events) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr])
            .map_err(AnnounceError::Socket)?;
    tokio::spawn(connection);
    Ok((handle, events))
}

/// Whether a notification concerns the interface `index`: one of its
/// addresses, or the link itself, changed (possibly by someone else).
fn concerns(message: &NetlinkMessage<RouteNetlinkMessage>, index: Option<u32>, name: &str) -> bool {
    match &message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a)) => {
            Some(a.header.index) == index
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l)) => {
            Some(l.header.index) == index
                || l.attributes.iter().any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
        }
        _ => false,
    }
}

/// The managed interface, found or created.
#[derive(Debug)]
struct Interface {
    name: String,
    index: u32,
}

/// What a link is, for the error that refuses it.
fn describe_kind(link: &LinkMessage) -> (Option<InfoKind>, String) {
    let kind = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    });
    let text = match &kind {
        Some(k) => format!("a {k} interface"),
        None => "a physical or loopback device (no link kind)".to_owned(),
    };
    (kind, text)
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, AnnounceError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        // ENODEV: no such interface.
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == 19 => Ok(None),
        Err(e) => Err(AnnounceError::netlink("look up", name, e)),
    }
}

impl Interface {
    /// Finds the interface `settings.interface` or creates it, checks its
    /// kind, and brings it up.
    async fn open(handle: &Handle, settings: &AnnounceSettings) -> Result<Interface, AnnounceError> {
        let name = settings.interface.as_str();
        let link = match find_link(handle, name).await? {
            Some(link) => {
                let (kind, found) = describe_kind(&link);
                if kind != Some(info_kind(settings.kind)) {
                    return Err(AnnounceError::WrongKind {
                        interface: name.to_owned(),
                        found,
                        wanted: settings.kind.name(),
                    });
                }
                info!(interface = name, kind = settings.kind.name(), "announce: using the existing interface");
                link
            }
            None => {
                let message = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(info_kind(settings.kind))
                    .name(name.to_owned())
                    .build();
                if let Err(e) = handle.link().add(message).execute().await {
                    if let rtnetlink::Error::NetlinkError(m) = &e
                        && m.raw_code().abs() == libc_errno::EOPNOTSUPP
                    {
                        return Err(AnnounceError::NoDriver { interface: name.to_owned(), kind: settings.kind.name() });
                    }
                    return Err(AnnounceError::netlink("create", name, e));
                }
                info!(interface = name, kind = settings.kind.name(), "announce: interface created");
                find_link(handle, name).await?.ok_or_else(|| AnnounceError::Netlink {
                    action: "find the new",
                    interface: name.to_owned(),
                    source: rtnetlink::Error::RequestFailed,
                })?
            }
        };
        let index = link.header.index;
        if !link.header.flags.contains(LinkFlags::Up) {
            let up = LinkUnspec::new_with_index(index).up().build();
            handle.link().set(up).execute().await.map_err(|e| AnnounceError::netlink("bring up", name, e))?;
        }
        Ok(Interface { name: name.to_owned(), index })
    }

    /// Every address on the interface, IPv4 and IPv6, as netlink messages.
    async fn addresses(&self, handle: &Handle) -> Result<Vec<AddressMessage>, AnnounceError> {
        handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| AnnounceError::netlink("list the addresses of", &self.name, e))
    }

    /// Makes the interface carry exactly `wanted`, as /32s. Returns the
    /// addresses added and removed.
    async fn sync(
        &self,
        handle: &Handle,
        wanted: &BTreeSet<Ipv4Addr>,
    ) -> Result<(Vec<Ipv4Addr>, Vec<String>), AnnounceError> {
        let mut present = BTreeSet::new();
        let mut removed = Vec::new();
        for msg in self.addresses(handle).await? {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(a) | AddressAttribute::Address(a) => Some(*a),
                _ => None,
            });
            let keep = match addr {
                Some(IpAddr::V4(a)) if msg.header.prefix_len == 32 && wanted.contains(&a) => {
                    present.insert(a);
                    true
                }
                // IPv6 link-local addresses the kernel adds are left alone.
                Some(IpAddr::V6(a)) if a.segments()[0] & 0xffc0 == 0xfe80 => true,
                _ => false,
            };
            if !keep {
                let text = match addr {
                    Some(a) => format!("{a}/{}", msg.header.prefix_len),
                    None => "an address without a value".to_owned(),
                };
                handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| AnnounceError::netlink("remove an address from", &self.name, e))?;
                removed.push(text);
            }
        }
        let mut added = Vec::new();
        for vip in wanted.difference(&present) {
            match handle.address().add(self.index, IpAddr::V4(*vip), 32).execute().await {
                Ok(()) => added.push(*vip),
                // Added meanwhile by someone else: it is there, as wanted.
                Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code().abs() == 17 => added.push(*vip),
                Err(e) => return Err(AnnounceError::netlink("add an address to", &self.name, e)),
            }
        }
        Ok((added, removed))
    }
}

/// Removes the interface `settings.interface` if it exists and is of the
/// configured kind (another kind is never touched). Returns the number of
/// IPv4 addresses it carried, all withdrawn with it, or `None` if there was
/// no such interface.
async fn remove_interface(handle: &Handle, settings: &AnnounceSettings) -> Result<Option<usize>, AnnounceError> {
    let name = settings.interface.as_str();
    let Some(link) = find_link(handle, name).await? else {
        return Ok(None);
    };
    if describe_kind(&link).0 != Some(info_kind(settings.kind)) {
        return Ok(None);
    }
    let iface = Interface { name: name.to_owned(), index: link.header.index };
    let count = iface
        .addresses(handle)
        .await?
        .iter()
        .filter(|m| m.attributes.iter().any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(_)))))
        .count();
    handle.link().del(iface.index).execute().await.map_err(|e| AnnounceError::netlink("remove", name, e))?;
    Ok(Some(count))
}

/// What the announcer is told after every publication: the settings in
/// force and the eligibility of every VIP.
#[derive(Clone, Debug, Default)]
pub struct AnnounceInput {
    /// `[announce]` of the configuration in force.
    pub settings: AnnounceSettings,
    /// [`eligibility`] of the state in force.
    pub eligibility: BTreeMap<Ipv4Addr, bool>,
}

/// One VIP as the metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipStatus {
    /// It has at least one backend that can take new flows.
    pub eligible: bool,
    /// It is on the interface (eligible, or held down).
    pub announced: bool,
}

/// The announcer's state for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct AnnounceStatus {
    /// `[announce] enabled`.
    pub enabled: bool,
    /// `[announce] interface`.
    pub interface: String,
    /// Every VIP of the desired state.
    pub vips: BTreeMap<Ipv4Addr, VipStatus>,
    /// Failed attempts to bring the interface to the wanted state since
    /// start (each is retried).
    pub errors: u64,
    /// Every uplink port is down, so no VIP is announced.
    pub uplinks_down: bool,
}

/// Shared between the announcer, which writes it, and the metrics, which
/// read it (a short lock on the control plane's thread, never on the packet
/// path).
pub type SharedAnnounceStatus = Arc<Mutex<AnnounceStatus>>;

/// The announcer: keeps the interface's addresses equal to
/// [`Announcements::wanted`].
pub struct Announcer {
    handle: Handle,
    events: Events,
    settings: AnnounceSettings,
    interface: Option<Interface>,
    announcements: Announcements,
    eligibility: BTreeMap<Ipv4Addr, bool>,
    /// Every uplink port is down: nothing is announced.
    uplinks_down: bool,
    /// The last sync failed: retried at the next resync.
    failing: bool,
    status: SharedAnnounceStatus,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer").field("settings", &self.settings).field("interface", &self.interface).finish()
    }
}

impl Announcer {
    /// Opens the netlink connection and, when announcement is enabled, the
    /// interface, with every address removed: nothing is announced before
    /// the dataplane forwards (addresses left by a crashed vipgated go too).
    /// Must run inside the tokio runtime. Fails, naming the problem, when
    /// the interface cannot be managed.
    pub async fn start(settings: &AnnounceSettings) -> Result<Announcer, AnnounceError> {
        let (handle, events) = connect()?;
        let mut announcer = Announcer {
            handle,
            events,
            settings: settings.clone(),
            interface: None,
            announcements: Announcements::default(),
            eligibility: BTreeMap::new(),
            uplinks_down: false,
            failing: false,
            status: Arc::new(Mutex::new(AnnounceStatus {
                enabled: settings.enabled,
                interface: settings.interface.clone(),
                ..AnnounceStatus::default()
            })),
        };
        if settings.enabled {
            let iface = Interface::open(&announcer.handle, settings).await?;
            let (_, removed) = iface.sync(&announcer.handle, &BTreeSet::new()).await?;
            if !removed.is_empty() {
                warn!(interface = %iface.name, ?removed, "announce: removed addresses left on the interface");
            }
            announcer.interface = Some(iface);
        } else {
            info!("announce: off ([announce] enabled = false): no VIP is put on an interface");
        }
        Ok(announcer)
    }

    /// The state the metrics read.
    pub fn status(&self) -> SharedAnnounceStatus {
        Arc::clone(&self.status)
    }

    /// Follows `input` for ever: applies each new value, expires held-down
    /// VIPs on time, and resyncs every [`RESYNC_INTERVAL`]; follows
    /// `uplinks_down` (`link::uplinks_down` of the ports' latest links):
    /// while it is true nothing is announced. Errors are logged and
    /// retried; it never returns.
    pub async fn run(&mut self, input: &mut watch::Receiver<AnnounceInput>, uplinks_down: &mut watch::Receiver<bool>) {
        self.uplinks_down = *uplinks_down.borrow_and_update();
        if self.uplinks_down && self.settings.enabled {
            warn!("announce: every uplink port is down: no VIP is announced until one is up");
        }
        let mut resync = Instant::now() + RESYNC_INTERVAL;
        loop {
            let expiry = self.announcements.next_expiry(self.settings.hold_down);
            let wake = expiry.map_or(resync, |e| e.min(resync));
            tokio::select! {
                changed = input.changed() => {
                    if changed.is_err() {
                        // The daemon dropped the sender: it is stopping.
                        std::future::pending::<()>().await;
                    }
                    let new = input.borrow_and_update().clone();
                    self.apply(new).await;
                }
                changed = uplinks_down.changed() => {
                    if changed.is_err() {
                        // The daemon dropped the sender: it is stopping.
                        std::future::pending::<()>().await;
                    }
                    let down = *uplinks_down.borrow_and_update();
                    if down != self.uplinks_down {
                        self.uplinks_down = down;
                        if self.settings.enabled {
                            if down {
                                warn!("announce: every uplink port is down: every VIP withdrawn until one is up");
                            } else {
                                info!("announce: an uplink port is up: the eligible VIPs are announced again");
                            }
                        }
                        self.sync().await;
                    }
                }
                Some((event, _)) = self.events.next() => {
                    let index = self.interface.as_ref().map(|i| i.index);
                    let name = self.settings.interface.as_str();
                    let mut relevant = concerns(&event, index, name);
                    // Whatever else is queued (our own changes notify too:
                    // one address each) costs one comparison, not one each.
                    while let Ok((event, _)) = self.events.try_recv() {
                        relevant |= concerns(&event, index, name);
                    }
                    if self.settings.enabled && relevant {
                        if self.interface.is_none() {
                            self.reopen().await;
                        }
                        self.sync().await;
                        // The interface vanished under that sync (deleted
                        // by hand, its link notification drained in the
                        // same batch as its addresses'): no further event
                        // will come, so create it again now rather than at
                        // the next resync.
                        if self.interface.is_none() {
                            self.reopen().await;
                            self.sync().await;
                        }
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    self.announcements.expire(now, self.settings.hold_down);
                    if now >= resync {
                        resync = now + RESYNC_INTERVAL;
                        if self.settings.enabled && self.interface.is_none() {
                            self.reopen().await;
                        }
                    }
                    self.sync().await;
                }
            }
        }
    }

    /// Applies new settings and eligibility.
    async fn apply(&mut self, new: AnnounceInput) {
        let now = Instant::now();
        if interface_changes(&self.settings, &new.settings) {
            self.close().await;
            info!(
                enabled = new.settings.enabled,
                interface = %new.settings.interface,
                kind = new.settings.kind.name(),
                "announce: settings changed"
            );
            self.settings = new.settings;
            if self.settings.enabled {
                self.reopen().await;
            }
        } else if self.settings.hold_down != new.settings.hold_down {
            info!(
                from_ms = self.settings.hold_down.as_millis() as u64,
                to_ms = new.settings.hold_down.as_millis() as u64,
                "announce: hold-down changed"
            );
            self.settings = new.settings;
        }
        for (vip, eligible) in &new.eligibility {
            if self.eligibility.get(vip) != Some(eligible) {
                info!(%vip, eligible, "announce: VIP {}", if *eligible { "eligible" } else { "not eligible (no backend can take new flows)" });
            }
        }
        for vip in self.eligibility.keys().filter(|v| !new.eligibility.contains_key(v)) {
            info!(%vip, "announce: VIP no longer in the desired state (its last service was deleted)");
        }
        self.eligibility = new.eligibility;
        self.announcements.update(now, &self.eligibility, self.settings.hold_down);
        self.sync().await;
    }

    async fn reopen(&mut self) {
        match Interface::open(&self.handle, &self.settings).await {
            Ok(iface) => {
                self.interface = Some(iface);
                self.failing = false;
            }
            Err(e) => {
                self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner).errors += 1;
                error!("{e}; retrying every {}s", RESYNC_INTERVAL.as_secs());
            }
        }
    }

    /// Removes the interface in use (withdrawing its VIPs), if any.
    async fn close(&mut self) {
        if self.interface.take().is_some() {
            match remove_interface(&self.handle, &self.settings).await {
                Ok(n) => {
                    info!(interface = %self.settings.interface, withdrawn = n.unwrap_or(0), "announce: interface removed")
                }
                Err(e) => error!("{e}"),
            }
        }
    }

    /// Brings the interface to the wanted set and refreshes the status.
    async fn sync(&mut self) {
        let wanted = on_interface(&self.announcements, self.settings.enabled, self.uplinks_down);
        if let Some(iface) = &self.interface {
            match iface.sync(&self.handle, &wanted).await {
                Ok((added, removed)) => {
                    for vip in &added {
                        info!(%vip, interface = %iface.name, "announce: VIP announced");
                    }
                    for a in &removed {
                        info!(address = %a, interface = %iface.name, "announce: withdrawn");
                    }
                    if self.failing {
                        info!(interface = %iface.name, "announce: the interface is in the wanted state again");
                    }
                    self.failing = false;
                }
                Err(e) => {
                    self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner).errors += 1;
                    if !self.failing {
                        error!("{e}; retrying every {}s", RESYNC_INTERVAL.as_secs());
                    }
                    self.failing = true;
                    // The interface may have been deleted: look it up again.
                    if matches!(&e, AnnounceError::Netlink { .. }) {
                        self.interface = None;
                    }
                }
            }
        }
        let present = if self.interface.is_some() && !self.failing { wanted } else { BTreeSet::new() };
        let mut status = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        status.enabled = self.settings.enabled;
        status.interface = self.settings.interface.clone();
        status.uplinks_down = self.uplinks_down;
        status.vips = self
            .eligibility
            .iter()
            .map(|(vip, e)| (*vip, VipStatus { eligible: *e, announced: present.contains(vip) }))
            .collect();
        // A VIP held down after it left the desired state is still shown.
        for vip in present.iter().filter(|v| self.announcements.held_down(**v)) {
            status.vips.entry(*vip).or_insert(VipStatus { eligible: false, announced: true });
        }
    }

    /// At a clean shutdown: removes the interface, which withdraws every
    /// VIP at once, so the routers move the traffic to the other gateways
    /// before the dataplane stops. Uses the latest settings.
    pub async fn shutdown(&mut self) {
        if !self.settings.enabled {
            return;
        }
        match remove_interface(&self.handle, &self.settings).await {
            Ok(Some(n)) => {
                info!(interface = %self.settings.interface, withdrawn = n, "announce: interface removed, every VIP withdrawn")
            }
            Ok(None) => info!(interface = %self.settings.interface, "announce: no interface to remove"),
            Err(e) => error!("{e}; the VIPs on it stay announced"),
        }
        self.interface = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::announce_settings::check_interface_name;

    fn elig(pairs: &[(&str, bool)]) -> BTreeMap<Ipv4Addr, bool> {
        pairs.iter().map(|(a, e)| (a.parse().unwrap(), *e)).collect()
    }

    fn set(addrs: &[&str]) -> BTreeSet<Ipv4Addr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn eligible_vip_is_wanted_at_once_and_withdrawn_after_hold_down() {
        let hold = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut a = Announcements::default();
        a.update(t0, &elig(&[("198.18.100.1", true), ("198.18.100.2", false)]), hold);
        assert_eq!(a.wanted(), set(&["198.18.100.1"]));
        assert_eq!(a.next_expiry(hold), None);

        a.update(t0 + Duration::from_secs(1), &elig(&[("198.18.100.1", false), ("198.18.100.2", false)]), hold);
        assert_eq!(a.wanted(), set(&["198.18.100.1"]), "held down");
        assert!(a.held_down("198.18.100.1".parse().unwrap()));
        assert_eq!(a.next_expiry(hold), Some(t0 + Duration::from_secs(6)));
        a.expire(t0 + Duration::from_millis(5999), hold);
        assert_eq!(a.wanted(), set(&["198.18.100.1"]));
        a.expire(t0 + Duration::from_secs(6), hold);
        assert_eq!(a.wanted(), set(&[]));
        assert_eq!(a.next_expiry(hold), None);
    }

    #[test]
    fn a_vip_that_comes_back_within_the_hold_down_stays() {
        let hold = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut a = Announcements::default();
        a.update(t0, &elig(&[("198.18.100.1", true)]), hold);
        a.update(t0 + Duration::from_secs(1), &elig(&[("198.18.100.1", false)]), hold);
        a.update(t0 + Duration::from_secs(3), &elig(&[("198.18.100.1", true)]), hold);
        assert!(!a.held_down("198.18.100.1".parse().unwrap()));
        a.expire(t0 + Duration::from_secs(100), hold);
        assert_eq!(a.wanted(), set(&["198.18.100.1"]));
        // A second failure starts a fresh hold-down, from its own time.
        a.update(t0 + Duration::from_secs(100), &elig(&[("198.18.100.1", false)]), hold);
        assert_eq!(a.next_expiry(hold), Some(t0 + Duration::from_secs(105)));
    }

    #[test]
    fn zero_hold_down_withdraws_at_once_and_deleted_services_are_held_too() {
        let t0 = Instant::now();
        let mut a = Announcements::default();
        a.update(t0, &elig(&[("198.18.100.1", true), ("198.18.100.2", true)]), Duration::ZERO);
        a.update(t0, &elig(&[("198.18.100.2", false)]), Duration::ZERO);
        assert_eq!(a.wanted(), set(&[]));

        let hold = Duration::from_secs(2);
        a.update(t0, &elig(&[("198.18.100.3", true)]), hold);
        // The VIP's last service was deleted: held down like a failure.
        a.update(t0 + Duration::from_secs(1), &elig(&[]), hold);
        assert_eq!(a.wanted(), set(&["198.18.100.3"]));
        a.expire(t0 + Duration::from_secs(3), hold);
        assert_eq!(a.wanted(), set(&[]));
    }

    #[test]
    fn uplinks_down_withdraw_every_vip_at_once_and_keep_the_announcements() {
        let hold = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut a = Announcements::default();
        a.update(t0, &elig(&[("198.18.100.1", true), ("198.18.100.2", true)]), hold);
        assert_eq!(on_interface(&a, true, false), set(&["198.18.100.1", "198.18.100.2"]));
        // The links go: nothing is announced, at once, whatever the
        // hold-down; announcement off announces nothing either.
        assert_eq!(on_interface(&a, true, true), set(&[]));
        assert_eq!(on_interface(&a, false, false), set(&[]));
        // Meanwhile the state moves on as usual: a VIP loses its backends
        // and its hold-down runs out.
        a.update(t0 + Duration::from_secs(1), &elig(&[("198.18.100.1", true), ("198.18.100.2", false)]), hold);
        assert_eq!(on_interface(&a, true, true), set(&[]));
        a.expire(t0 + Duration::from_secs(7), hold);
        // A link is back: the VIPs are what they would have been.
        assert_eq!(on_interface(&a, true, false), set(&["198.18.100.1"]));
    }

    #[test]
    fn interface_names_are_checked_like_the_kernel_does() {
        assert!(check_interface_name("vipgate0").is_ok());
        assert!(check_interface_name("a23456789012345").is_ok());
        for bad in ["", "a234567890123456", "a/b", "a b", "a:1", ".", ".."] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(InterfaceKind::parse("dummy"), Ok(InterfaceKind::Dummy));
        assert_eq!(InterfaceKind::parse("ifb"), Ok(InterfaceKind::Ifb));
        assert!(InterfaceKind::parse("veth").unwrap_err().contains("\"veth\""));
    }
}
