//! What a health check is: its kind, timing and thresholds, with the one
//! validation the configuration file and the API share.
//!
//! Owns: the validated [`HealthCheck`], its defaults and limits, and the
//! check of every field (each error names the field and the reason). The
//! configuration file and the API only translate their own syntax into a
//! [`HealthCheckInput`] and map the field name of an error onto their own
//! field path. Must not probe anything: see `crate::health::probe`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;
use vipgate_dataplane::snapshot::Protocol;

/// Default time between two probes of one backend.
pub const DEFAULT_INTERVAL_MS: u32 = 5_000;
/// Default time a probe may take, when the interval allows it (see
/// [`default_timeout_ms`]).
pub const DEFAULT_TIMEOUT_MS: u32 = 2_000;
/// Shortest interval: 10 probes a second per backend is already a load.
pub const MIN_INTERVAL_MS: u32 = 100;
/// Longest interval: one hour.
pub const MAX_INTERVAL_MS: u32 = 3_600_000;
/// Shortest timeout: a shorter one fails on an ordinary round trip to a busy host.
pub const MIN_TIMEOUT_MS: u32 = 10;
/// Default number of successes in a row that bring a down backend up.
pub const DEFAULT_RISE: u32 = 2;
/// Default number of failures in a row that take an up backend down.
pub const DEFAULT_FALL: u32 = 3;
/// Largest rise and fall: at the longest interval, 100 hours.
pub const MAX_THRESHOLD: u32 = 100;
/// Default HTTP path.
pub const DEFAULT_PATH: &str = "/";
/// Default expected HTTP status codes.
pub const DEFAULT_EXPECT_STATUS: &str = "200-399";
/// Longest HTTP path.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest Host header.
pub const MAX_HOST_LEN: usize = 255;
/// Largest UDP payload and expected reply: one datagram on a 1500-byte
/// IPv4 link.
pub const MAX_UDP_PAYLOAD: usize = 1472;
/// Most ranges in an expected-status list.
pub const MAX_STATUS_RANGES: usize = 32;

/// The default timeout for `interval_ms`: [`DEFAULT_TIMEOUT_MS`], or half
/// the interval when that is shorter, so that an interval set alone is
/// always valid.
pub fn default_timeout_ms(interval_ms: u32) -> u32 {
    DEFAULT_TIMEOUT_MS.min(interval_ms / 2)
}

/// A validated health check of a service: every backend of the service is
/// probed this way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// What a probe does.
    pub kind: CheckKind,
    /// Time between the starts of two probes of one backend.
    pub interval_ms: u32,
    /// Time a probe may take; less than the interval.
    pub timeout_ms: u32,
    /// Successes in a row that bring a down backend up.
    pub rise: u32,
    /// Failures in a row that take an up backend down.
    pub fall: u32,
    /// Port probed; `None`: the backend's own port.
    pub port: Option<u16>,
    /// Local address probes are sent from; `None`: the kernel chooses by
    /// its routes.
    pub source: Option<Ipv4Addr>,
}

impl HealthCheck {
    /// The interval as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.into())
    }

    /// The timeout as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.into())
    }

    /// Whether this check can probe the backends of `service`, a service
    /// of `protocol`: a check of the other protocol needs a `port` of its
    /// own, since on the service's port it can only fail and would take
    /// every backend out. The file and the API both call it.
    pub fn check_service_protocol(&self, service: &str, protocol: Protocol) -> Result<(), HealthCheckError> {
        let probes_udp = matches!(self.kind, CheckKind::Udp(_));
        if self.port.is_some() || probes_udp == (protocol == Protocol::Udp) {
            return Ok(());
        }
        let kind = self.kind.name();
        if probes_udp {
            err(
                "kind",
                format!(
                    "{kind:?} probes over UDP, but service {service:?} is tcp: on the service's port it can only fail; use kind = \"tcp\", \"http\" or \"https\", or set port to a UDP port the backends answer on"
                ),
            )
        } else {
            err(
                "kind",
                format!(
                    "{kind:?} probes over TCP, but service {service:?} is udp: on the service's port it can only fail; use kind = \"udp\" with a payload, or set port to a TCP port the backends listen on"
                ),
            )
        }
    }
}

/// What a probe does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection is established (then closed).
    Tcp,
    /// An HTTP/1.1 GET answers with an expected status.
    Http(HttpCheck),
    /// An HTTP/1.1 GET over TLS answers with an expected status. The
    /// server's certificate is not verified: the check tells whether the
    /// backend serves, not who it is.
    Https(HttpCheck),
    /// A datagram is sent and a reply (starting with the expected bytes, if
    /// any) comes back.
    Udp(UdpCheck),
}

impl CheckKind {
    /// `tcp`, `http`, `https` or `udp`.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http(_) => "http",
            CheckKind::Https(_) => "https",
            CheckKind::Udp(_) => "udp",
        }
    }
}

/// An HTTP(S) GET.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// Path and query, starting with `/`.
    pub path: String,
    /// Host header (and TLS server name when it is a DNS name); `None`:
    /// the probed `address:port`.
    pub host: Option<String>,
    /// Status codes that count as a success.
    pub expect_status: StatusRanges,
}

/// A UDP request and its expected reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpCheck {
    /// The datagram sent.
    pub payload: Vec<u8>,
    /// The reply must start with these bytes; `None`: any reply.
    pub expect_reply: Option<Vec<u8>>,
}

/// A set of HTTP status codes, written like `200-299,301`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StatusRanges(Vec<(u16, u16)>);

impl StatusRanges {
    /// Parses a comma-separated list of codes and inclusive ranges, each
    /// from 100 to 599.
    pub fn parse(s: &str) -> Result<StatusRanges, String> {
        let mut ranges = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("{s:?} has an empty item; write codes and ranges like \"200-299,301\""));
            }
            let code = |t: &str| -> Result<u16, String> {
                match t.trim().parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => Ok(c),
                    _ => Err(format!("{:?} in {s:?} is not an HTTP status code from 100 to 599", t.trim())),
                }
            };
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (code(a)?, code(b)?),
                None => {
                    let c = code(part)?;
                    (c, c)
                }
            };
            if lo > hi {
                return Err(format!("{part:?} in {s:?} is not a range: {lo} is above {hi}"));
            }
            ranges.push((lo, hi));
        }
        if ranges.len() > MAX_STATUS_RANGES {
            return Err(format!("{} items in {s:?}; at most {MAX_STATUS_RANGES}", ranges.len()));
        }
        Ok(StatusRanges(ranges))
    }

    /// Whether `code` is in the set.
    pub fn contains(&self, code: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

impl fmt::Display for StatusRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi { write!(f, "{lo}")? } else { write!(f, "{lo}-{hi}")? }
        }
        Ok(())
    }
}

impl TryFrom<String> for StatusRanges {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        StatusRanges::parse(&s)
    }
}

impl From<StatusRanges> for String {
    fn from(s: StatusRanges) -> String {
        s.to_string()
    }
}

/// A health check as written, before validation: what the configuration
/// file and the API both translate into. `None` means not given (the
/// default applies, or the field is not used by the kind).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheckInput {
    /// `tcp`, `http`, `https` or `udp`.
    pub kind: Option<String>,
    /// Milliseconds between probes.
    pub interval_ms: Option<i64>,
    /// Milliseconds a probe may take.
    pub timeout_ms: Option<i64>,
    /// Successes in a row to come up.
    pub rise: Option<i64>,
    /// Failures in a row to go down.
    pub fall: Option<i64>,
    /// Port probed.
    pub port: Option<i64>,
    /// HTTP path.
    pub path: Option<String>,
    /// HTTP Host header.
    pub host: Option<String>,
    /// HTTP expected status codes.
    pub expect_status: Option<String>,
    /// UDP payload.
    pub payload: Option<Vec<u8>>,
    /// UDP expected reply prefix.
    pub expect_reply: Option<Vec<u8>>,
    /// Source address.
    pub source: Option<String>,
}

/// A refused health check: the field (as named in the file and the API,
/// such as `timeout_ms`) and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct HealthCheckError {
    /// The field's name inside the health check.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn err<T>(field: &'static str, reason: impl Into<String>) -> Result<T, HealthCheckError> {
    Err(HealthCheckError { field, reason: reason.into() })
}

fn in_range(field: &'static str, v: i64, lo: u32, hi: u32, unit: &str) -> Result<u32, HealthCheckError> {
    match u32::try_from(v) {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => err(field, format!("{v} is not from {lo} to {hi}{unit}")),
    }
}

/// Visible ASCII with no space: what a path or a Host header may hold
/// without being re-encoded.
fn visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl HealthCheckInput {
    /// Checks every field and fills in the defaults.
    pub fn validate(&self) -> Result<HealthCheck, HealthCheckError> {
        let kind = match self.kind.as_deref().map(str::trim) {
            None | Some("") => return err("kind", "is required: \"tcp\", \"http\", \"https\" or \"udp\""),
            Some(k) => k.to_ascii_lowercase(),
        };
        if !matches!(kind.as_str(), "tcp" | "http" | "https" | "udp") {
            return err("kind", format!("{kind:?} is not \"tcp\", \"http\", \"https\" or \"udp\""));
        }
        let interval_ms = match self.interval_ms {
            None => DEFAULT_INTERVAL_MS,
            Some(v) => in_range("interval_ms", v, MIN_INTERVAL_MS, MAX_INTERVAL_MS, " milliseconds")?,
        };
        let timeout_ms = match self.timeout_ms {
            None => default_timeout_ms(interval_ms),
            Some(v) => {
                let t = in_range("timeout_ms", v, MIN_TIMEOUT_MS, MAX_INTERVAL_MS, " milliseconds")?;
                if t >= interval_ms {
                    return err(
                        "timeout_ms",
                        format!(
                            "{t} must be less than interval_ms ({interval_ms}): a probe ends before the next starts"
                        ),
                    );
                }
                t
            }
        };
        let rise = match self.rise {
            None => DEFAULT_RISE,
            Some(v) => in_range("rise", v, 1, MAX_THRESHOLD, "")?,
        };
        let fall = match self.fall {
            None => DEFAULT_FALL,
            Some(v) => in_range("fall", v, 1, MAX_THRESHOLD, "")?,
        };
        let port = match self.port {
            None => None,
            Some(v) => match u16::try_from(v) {
                Ok(p) if p != 0 => Some(p),
                _ => return err("port", format!("{v} is not a port number from 1 to 65535")),
            },
        };
        let source = match self.source.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => match s.parse::<Ipv4Addr>() {
                Ok(a) if !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast() => Some(a),
                Ok(a) => return err("source", format!("{a} is not a unicast address")),
                Err(_) => return err("source", format!("{s:?} is not an IPv4 address")),
            },
        };
        let http = kind == "http" || kind == "https";
        if !http {
            for (field, given) in [
                ("path", self.path.is_some()),
                ("host", self.host.is_some()),
                ("expect_status", self.expect_status.is_some()),
            ] {
                if given {
                    return err(field, format!("is only used with kind \"http\" or \"https\", not {kind:?}"));
                }
            }
        }
        if kind != "udp" {
            for (field, given) in [("payload", self.payload.is_some()), ("expect_reply", self.expect_reply.is_some())] {
                if given {
                    return err(field, format!("is only used with kind \"udp\", not {kind:?}"));
                }
            }
        }
        let kind = match kind.as_str() {
            "tcp" => CheckKind::Tcp,
            "http" | "https" => {
                let path = self.path.clone().unwrap_or_else(|| DEFAULT_PATH.to_owned());
                if !path.starts_with('/') {
                    return err("path", format!("{path:?} must start with '/'"));
                }
                if path.len() > MAX_PATH_LEN {
                    return err("path", format!("is {} bytes long; at most {MAX_PATH_LEN}", path.len()));
                }
                if !visible_ascii(&path) {
                    return err(
                        "path",
                        format!("{path:?} must be visible ASCII without spaces (percent-encode the rest)"),
                    );
                }
                let host = match &self.host {
                    None => None,
                    Some(h) if h.is_empty() => return err("host", "must not be empty (leave it out for address:port)"),
                    Some(h) if h.len() > MAX_HOST_LEN => {
                        return err("host", format!("is {} bytes long; at most {MAX_HOST_LEN}", h.len()));
                    }
                    Some(h) if !visible_ascii(h) => {
                        return err("host", format!("{h:?} must be visible ASCII without spaces"));
                    }
                    Some(h) => Some(h.clone()),
                };
                let expect_status = StatusRanges::parse(self.expect_status.as_deref().unwrap_or(DEFAULT_EXPECT_STATUS))
                    .or_else(|r| err("expect_status", r))?;
                let h = HttpCheck { path, host, expect_status };
                if kind == "http" { CheckKind::Http(h) } else { CheckKind::Https(h) }
            }
            "udp" => {
                let payload = match &self.payload {
                    None => return err("payload", "a udp check needs a payload to send"),
                    Some(p) if p.is_empty() => return err("payload", "a udp check needs a payload to send"),
                    Some(p) if p.len() > MAX_UDP_PAYLOAD => {
                        return err("payload", format!("is {} bytes; at most {MAX_UDP_PAYLOAD}", p.len()));
                    }
                    Some(p) => p.clone(),
                };
                let expect_reply = match &self.expect_reply {
                    Some(r) if r.len() > MAX_UDP_PAYLOAD => {
                        return err("expect_reply", format!("is {} bytes; at most {MAX_UDP_PAYLOAD}", r.len()));
                    }
                    Some(r) if r.is_empty() => None,
                    other => other.clone(),
                };
                CheckKind::Udp(UdpCheck { payload, expect_reply })
            }
            other => return err("kind", format!("{other:?} is not \"tcp\", \"http\", \"https\" or \"udp\"")),
        };
        Ok(HealthCheck { kind, interval_ms, timeout_ms, rise, fall, port, source })
    }
}

/// Parses hexadecimal bytes (`"0a1b"`, spaces allowed between bytes).
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("{s:?} has an odd number of hexadecimal digits"));
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("{s:?} is not hexadecimal bytes"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(kind: &str) -> HealthCheckInput {
        HealthCheckInput { kind: Some(kind.to_owned()), ..HealthCheckInput::default() }
    }

    #[test]
    fn defaults_fill_in_every_field() {
        let c = input("http").validate().unwrap();
        assert_eq!((c.interval_ms, c.timeout_ms, c.rise, c.fall, c.port, c.source), (5000, 2000, 2, 3, None, None));
        let CheckKind::Http(h) = &c.kind else { panic!("{c:?}") };
        assert_eq!((h.path.as_str(), h.host.as_deref(), h.expect_status.to_string()), ("/", None, "200-399".into()));
        // An interval set alone gets a timeout below it.
        let c = HealthCheckInput { interval_ms: Some(200), ..input("tcp") }.validate().unwrap();
        assert_eq!((c.interval_ms, c.timeout_ms), (200, 100));
    }

    #[test]
    fn status_ranges_parse_print_and_match() {
        let s = StatusRanges::parse("200-299, 301").unwrap();
        assert_eq!(s.to_string(), "200-299,301");
        assert!(s.contains(200) && s.contains(299) && s.contains(301));
        assert!(!s.contains(300) && !s.contains(302) && !s.contains(199));
    }

    #[test]
    fn every_bad_field_is_named_with_its_reason() {
        let udp = |p: &[u8]| HealthCheckInput { payload: Some(p.to_vec()), ..input("udp") };
        let cases: Vec<(HealthCheckInput, &str, &str)> = vec![
            (HealthCheckInput::default(), "kind", "is required"),
            (input("icmp"), "kind", "\"icmp\" is not \"tcp\", \"http\", \"https\" or \"udp\""),
            (
                HealthCheckInput { interval_ms: Some(50), ..input("tcp") },
                "interval_ms",
                "50 is not from 100 to 3600000",
            ),
            (HealthCheckInput { interval_ms: Some(-1), ..input("tcp") }, "interval_ms", "-1 is not from 100"),
            (HealthCheckInput { timeout_ms: Some(5), ..input("tcp") }, "timeout_ms", "5 is not from 10"),
            (
                HealthCheckInput { interval_ms: Some(200), timeout_ms: Some(200), ..input("tcp") },
                "timeout_ms",
                "200 must be less than interval_ms (200)",
            ),
            (HealthCheckInput { rise: Some(0), ..input("tcp") }, "rise", "0 is not from 1 to 100"),
            (HealthCheckInput { fall: Some(101), ..input("tcp") }, "fall", "101 is not from 1 to 100"),
            (HealthCheckInput { port: Some(0), ..input("tcp") }, "port", "0 is not a port number"),
            (HealthCheckInput { port: Some(65536), ..input("tcp") }, "port", "65536 is not a port number"),
            (HealthCheckInput { source: Some("x".into()), ..input("tcp") }, "source", "not an IPv4 address"),
            (HealthCheckInput { source: Some("224.0.0.1".into()), ..input("tcp") }, "source", "not a unicast"),
            (HealthCheckInput { path: Some("/".into()), ..input("tcp") }, "path", "only used with kind \"http\""),
            (HealthCheckInput { host: Some("h".into()), ..input("udp") }, "host", "only used with kind \"http\""),
            (
                HealthCheckInput { expect_status: Some("200".into()), ..input("tcp") },
                "expect_status",
                "only used with kind",
            ),
            (
                HealthCheckInput { payload: Some(b"x".to_vec()), ..input("http") },
                "payload",
                "only used with kind \"udp\"",
            ),
            (
                HealthCheckInput { expect_reply: Some(b"x".to_vec()), ..input("tcp") },
                "expect_reply",
                "only used with kind \"udp\"",
            ),
            (HealthCheckInput { path: Some("health".into()), ..input("http") }, "path", "must start with '/'"),
            (HealthCheckInput { path: Some("/a b".into()), ..input("https") }, "path", "visible ASCII"),
            (
                HealthCheckInput { path: Some(format!("/{}", "a".repeat(1024))), ..input("http") },
                "path",
                "at most 1024",
            ),
            (HealthCheckInput { host: Some(String::new()), ..input("http") }, "host", "must not be empty"),
            (HealthCheckInput { host: Some("a b".into()), ..input("http") }, "host", "visible ASCII"),
            (
                HealthCheckInput { expect_status: Some("200-".into()), ..input("http") },
                "expect_status",
                "not an HTTP status",
            ),
            (
                HealthCheckInput { expect_status: Some("600".into()), ..input("http") },
                "expect_status",
                "from 100 to 599",
            ),
            (
                HealthCheckInput { expect_status: Some("299-200".into()), ..input("http") },
                "expect_status",
                "not a range",
            ),
            (
                HealthCheckInput { expect_status: Some("200,,301".into()), ..input("http") },
                "expect_status",
                "empty item",
            ),
            (input("udp"), "payload", "needs a payload"),
            (udp(b""), "payload", "needs a payload"),
            (udp(&[0; 1473]), "payload", "at most 1472"),
            (HealthCheckInput { expect_reply: Some(vec![0; 1473]), ..udp(b"x") }, "expect_reply", "at most 1472"),
        ];
        for (i, (input, field, reason)) in cases.iter().enumerate() {
            let e = input.validate().expect_err(&format!("case {i}: {input:?}"));
            assert_eq!(e.field, *field, "case {i}: {e}");
            assert!(e.reason.contains(reason), "case {i}: {e:?} lacks {reason:?}");
        }
    }

    #[test]
    fn hex_payloads() {
        assert_eq!(parse_hex("0a 1B ff").unwrap(), vec![0x0a, 0x1b, 0xff]);
        assert!(parse_hex("abc").unwrap_err().contains("odd number"));
        assert!(parse_hex("zz").unwrap_err().contains("not hexadecimal"));
    }

    #[test]
    fn a_check_survives_its_json_form() {
        let c = HealthCheckInput {
            expect_status: Some("200-299,301".into()),
            host: Some("web.example".into()),
            port: Some(8443),
            ..input("https")
        }
        .validate()
        .unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<HealthCheck>(&text).unwrap(), c);
        let u =
            HealthCheckInput { payload: Some(b"ping".to_vec()), expect_reply: Some(b"pong".to_vec()), ..input("udp") };
        let u = u.validate().unwrap();
        assert_eq!(serde_json::from_str::<HealthCheck>(&serde_json::to_string(&u).unwrap()).unwrap(), u);
    }
}
