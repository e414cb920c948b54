//! The operator's documentation and the code agree: every metric family the
//! daemon exports is in the metric list of `docs/ops/metrics.md`, and
//! nothing else is; every drop reason is in its drop reason table, and
//! nothing else is. (The configuration keys are checked against
//! `docs/configuration.md` by the config module's own tests, which see its
//! private parser types.)
//!
//! The code's side is taken from the code itself: the families from the
//! text `metrics::render` writes for a gateway that has every optional part
//! (a bond, a checked backend, the announcer, a kernel interface), the
//! reasons from `DropReason::ALL`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use vipgate_controlplane::announce::AnnounceStatus;
use vipgate_controlplane::api::{
    BondMemberView, ExceptionView, GatewayView, MempoolView, PortStats, PortView, WorkerView,
};
use vipgate_controlplane::health::{Checker, HealthCheckInput, HealthStatus, Target, TargetKey};
use vipgate_controlplane::link::BondMemberLink;
use vipgate_controlplane::metrics;
use vipgate_dataplane::counters::{DropReason, WorkerCounters};

/// The text of `docs/<name>`; a missing file fails the test.
fn doc(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The lines of the section that starts with the heading `heading` (a whole
/// line), up to the next heading of the same or a higher level. Panics if
/// there is no such heading.
fn section<'a>(text: &'a str, heading: &str) -> Vec<&'a str> {
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut lines = text.lines().skip_while(|l| *l != heading);
    assert!(lines.next().is_some(), "no heading {heading:?}");
    let mut fenced = false;
    lines
        .take_while(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
            }
            let hashes = l.chars().take_while(|&c| c == '#').count();
            fenced || !(hashes > 0 && hashes <= level && l[hashes..].starts_with(' '))
        })
        .collect()
}

/// The cells of a Markdown table row (`| a | b |`), trimmed; `None` for a
/// line that is not a row, or is the header's separator.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    let cells: Vec<&str> = inner.split('|').map(str::trim).collect();
    (!cells.iter().all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))).then_some(cells)
}

/// The `code spans` of a cell.
fn spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// Fails with both lists when the sets differ.
fn same(what: &str, code: &BTreeSet<String>, docs: &BTreeSet<String>, doc_place: &str) {
    let undocumented: Vec<&String> = code.difference(docs).collect();
    let unknown: Vec<&String> = docs.difference(code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "{what}: the code and {doc_place} disagree\n  in the code, not documented: {undocumented:?}\n  documented, not in the code: {unknown:?}"
    );
}

/// A gateway with every part that brings its own metric families.
struct Everything {
    health: Arc<HealthStatus>,
}

impl GatewayView for Everything {
    fn workers(&self) -> Vec<WorkerView> {
        vec![WorkerView {
            lcore: 1,
            counters: Arc::new(WorkerCounters::default()),
            snapshot: Arc::default(),
            since_last_loop: Some(std::time::Duration::from_millis(1)),
        }]
    }
    fn ports(&self) -> Vec<PortView> {
        let member = BondMemberView {
            link: BondMemberLink { device: "net_tap0".to_owned(), ..BondMemberLink::default() },
            stats: PortStats::default(),
        };
        vec![PortView { name: "uplink".to_owned(), uplink: true, members: vec![member], ..PortView::default() }]
    }
    fn mempool(&self) -> MempoolView {
        MempoolView { name: "vipgate_mbufs".to_owned(), size: 1023, in_use: 0 }
    }
    fn serving(&self) -> bool {
        true
    }
    fn health(&self) -> Option<Arc<HealthStatus>> {
        Some(Arc::clone(&self.health))
    }
    fn announce(&self) -> Option<AnnounceStatus> {
        Some(AnnounceStatus { enabled: true, ..AnnounceStatus::default() })
    }
    fn exception(&self) -> Option<ExceptionView> {
        Some(ExceptionView::default())
    }
}

/// Each exposed metric of the rendered text (a counter family `X` as
/// `X_total`), with its type.
fn rendered_families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|rest| {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            let exposed = if kind == "counter" { format!("{name}_total") } else { name.to_owned() };
            (exposed, kind.to_owned())
        })
        .collect()
}

/// The metric list's rows: each metric named in a row's first cell, with
/// the row's type. A name that starts with `_` abbreviates the first name of
/// its cell with its ending replaced (`vipgate_bond_member_rx_packets_total`,
/// `_tx_packets_total`); which ending is resolved against `known`, the
/// code's names, and an abbreviation that fits none is kept as written, so
/// that it shows as unknown.
fn documented_families(list: &[&str], known: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for row in list.iter().filter_map(|l| cells(l)) {
        let [names, kind, ..] = row[..] else { continue };
        let names = spans(names);
        let Some(first) = names.first().copied() else { continue };
        if !first.contains('_') || names.iter().any(|n| n.contains(' ')) {
            continue;
        }
        for name in names {
            let full = if name.starts_with('_') {
                first
                    .match_indices('_')
                    .map(|(i, _)| format!("{}{name}", &first[..i]))
                    .find(|c| known.contains_key(c))
                    .unwrap_or_else(|| format!("{first} ... {name}"))
            } else {
                name.to_owned()
            };
            assert!(out.insert(full.clone(), kind.to_owned()).is_none(), "{full} is listed twice");
        }
    }
    out
}

#[tokio::test(flavor = "current_thread")]
async fn every_metric_family_is_in_the_metric_list_and_only_those() {
    // A checked backend, so that the health families are written: the
    // checker records its status as soon as the plan is applied.
    let health = Arc::new(HealthStatus::default());
    let (mut checker, _reports) = Checker::new(Arc::clone(&health));
    let check = HealthCheckInput {
        kind: Some("tcp".to_owned()),
        interval_ms: Some(60_000),
        timeout_ms: Some(100),
        ..HealthCheckInput::default()
    }
    .validate()
    .expect("a valid check");
    let key = TargetKey { service: "web".to_owned(), address: Ipv4Addr::LOCALHOST, port: 9 };
    checker.apply(checker.plan(vec![Target { key, check: Some(check) }]));

    let text = metrics::render(Arc::new(Everything { health: Arc::clone(&health) }));
    drop(checker);
    let code = rendered_families(&text);
    let ops = doc("ops/metrics.md");
    let docs = documented_families(&section(&ops, "### Metric list"), &code);
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<BTreeSet<String>>();
    same("metric families", &names(&code), &names(&docs), "docs/ops/metrics.md \"### Metric list\"");
    let wrong: Vec<String> = code
        .iter()
        .filter(|(name, kind)| docs[*name] != **kind)
        .map(|(name, kind)| format!("{name} is a {kind}, listed as {}", docs[name]))
        .collect();
    assert!(wrong.is_empty(), "types in docs/ops/metrics.md \"### Metric list\": {wrong:?}");
}

#[test]
fn every_drop_reason_is_in_the_drop_reason_table_and_only_those() {
    let code: BTreeSet<String> = DropReason::ALL.iter().map(|r| r.name().to_owned()).collect();
    assert_eq!(code.len(), DropReason::COUNT, "two reasons have one name");
    let ops = doc("ops/metrics.md");
    let mut docs = BTreeSet::new();
    for row in section(&ops, "## Drop reasons").iter().filter_map(|l| cells(l)) {
        if let [name] = spans(row[0])[..] {
            assert!(docs.insert(name.to_owned()), "{name} is listed twice");
        }
    }
    same("drop reasons", &code, &docs, "docs/ops/metrics.md \"## Drop reasons\"");
}

/// The anchor GitHub gives a heading: lowercase, punctuation other than `-`
/// and `_` dropped, spaces turned into `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|&c| c.is_alphanumeric() || c == '-' || c == '_' || c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The lines of a markdown text outside fenced code blocks, numbered from 1.
fn unfenced(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// Every anchor of a markdown text; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in unfenced(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = anchor(&line[hashes..]);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
        *n += 1;
    }
    out
}

/// The targets of the inline links `[text](target)` of a line, code spans
/// left out.
fn link_targets(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 1 {
            continue;
        }
        let mut rest = part;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            out.push(target);
            rest = &rest[end..];
        }
    }
    out
}

fn markdown_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            markdown_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

/// Every relative link in README.md and docs/**/*.md leads to a file that
/// exists and, with `#anchor` into a markdown file, to a heading of it.
#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().expect("the repository's root");
    let mut files = vec![root.join("README.md")];
    markdown_files(&root.join("docs"), &mut files);
    files.sort();
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    };
    let mut broken = Vec::new();
    for file in &files {
        let text = read(file);
        let shown = file.strip_prefix(&root).unwrap_or(file).display().to_string();
        for (number, line) in unfenced(&text) {
            for target in link_targets(line) {
                let scheme = target.split(['/', '#']).next().unwrap_or("").contains(':');
                if target.is_empty() || scheme {
                    continue;
                }
                let (path, fragment) = match target.split_once('#') {
                    Some((path, fragment)) => (path, Some(fragment)),
                    None => (target, None),
                };
                let dest =
                    if path.is_empty() { file.clone() } else { file.parent().expect("a file's directory").join(path) };
                if !dest.exists() {
                    broken.push(format!("{shown}:{number}: {target} (no such file)"));
                    continue;
                }
                if let Some(fragment) = fragment
                    && dest.extension().is_some_and(|e| e == "md")
                    && !anchors(&read(&dest)).contains(fragment)
                {
                    broken.push(format!("{shown}:{number}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(files.len() > 2, "no documentation found under {}", root.display());
    assert!(broken.is_empty(), "{} broken link(s):\n  {}", broken.len(), broken.join("\n  "));
}
