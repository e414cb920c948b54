//! The library's top-level modules (`controlplane/src/*.rs`) form a DAG:
//! no module reaches itself through the `crate::` paths of their non-test
//! code. The layering is in `docs/architecture.md`.
//!
//! The check reads the sources, not the compiler's view: it blanks comments
//! (doc links included) and literals, drops every `#[cfg(test)]` item and
//! every `tests.rs` file, then takes the first segment of each `crate::`
//! path, `crate::{a, b::C}` groups included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's edges: the module used, with the first place that uses it.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// `text` with comments and the contents of string and char literals
/// replaced by spaces; newlines are kept, so line numbers still hold.
fn blank(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let keep = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(i + k).copied().unwrap_or('\0');
        if at(0) == '/' && at(1) == '/' {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if at(0) == '/' && at(1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(keep(c[i]));
                    i += 1;
                }
            }
        } else if at(0) == 'r'
            && (at(1) == '"' || (at(1) == '#' && (at(2) == '"' || at(2) == '#')))
            && (i == 0 || !is_ident(c[i - 1]))
        {
            // A raw string: r"..." or r#"..."#.
            let mut hashes = 0;
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            out.push('"');
            i = j + 1;
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                out.push(keep(c[i]));
                i += 1;
            }
            out.push('"');
        } else if at(0) == '"' {
            out.push('"');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(keep(c[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if at(0) == '\'' && (at(1) == '\\' || at(2) == '\'') {
            // A char literal ('x', '\n', '\u{7f}'), not a lifetime.
            out.push('\'');
            i += 1;
            while i < c.len() && c[i] != '\'' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                out.push(' ');
                i += 1;
            }
            out.push('\'');
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// `code` (already blanked) without the items marked `#[cfg(test)]`.
fn drop_test_items(code: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let c: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len());
    let mut i = 0;
    while i < c.len() {
        if c[i..].starts_with(&MARK.chars().collect::<Vec<_>>()) {
            // The item ends at a `;` outside brackets or at the `}` that
            // closes its body.
            let mut depth = 0i32;
            let mut j = i + MARK.len();
            while j < c.len() {
                match c[j] {
                    '(' | '[' | '{' => depth += 1,
                    ')' | ']' => depth -= 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ';' if depth == 0 => break,
                    _ => {}
                }
                j += 1;
            }
            for &ch in &c[i..(j + 1).min(c.len())] {
                out.push(if ch == '\n' { '\n' } else { ' ' });
            }
            i = j + 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// The first segment of every `crate::` path in `code`, with its line.
fn crate_paths(code: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (start, _) in code.match_indices("crate::") {
        if code[..start].chars().next_back().is_some_and(|ch| is_ident(ch) && ch != '$') {
            continue;
        }
        let line = code[..start].matches('\n').count() + 1;
        let rest = code[start + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{C, D}}`: the first segment of each top-level part.
            let mut depth = 0;
            let mut part = String::new();
            let mut parts = Vec::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => parts.push(std::mem::take(&mut part)),
                    _ => {}
                }
                if depth == 0 && ch != ',' {
                    part.push(ch);
                }
            }
            parts.push(part);
            for p in parts {
                let name: String = p.trim_start().chars().take_while(|&ch| is_ident(ch)).collect();
                if !name.is_empty() {
                    out.push((name, line));
                }
            }
        } else {
            let name: String = rest.chars().take_while(|&ch| is_ident(ch)).collect();
            if !name.is_empty() {
                out.push((name, line));
            }
        }
    }
    out
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module graph of the library under `src`: each top-level module
/// (`src/m.rs` with `src/m/**`) to the other top-level modules its
/// non-test code names.
fn module_graph(src: &Path) -> Graph {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let lib = drop_test_items(&blank(&lib));
    let modules: BTreeSet<String> = lib
        .split(';')
        .filter_map(|item| {
            let words: Vec<&str> = item.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "mod")?;
            (words.len() == at + 2).then(|| words[at + 1].to_owned())
        })
        .collect();
    assert!(modules.len() > 3, "no modules found in src/lib.rs: {modules:?}");
    let mut graph = Graph::new();
    for m in &modules {
        graph.insert(m.clone(), BTreeMap::new());
        let mut files = vec![src.join(format!("{m}.rs"))];
        if src.join(m).is_dir() {
            rust_files(&src.join(m), &mut files);
        }
        files.sort();
        for file in files.iter().filter(|f| f.file_name().is_some_and(|n| n != "tests.rs")) {
            let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let code = drop_test_items(&blank(&text));
            for (used, line) in crate_paths(&code) {
                if &used != m && modules.contains(&used) {
                    let at = format!("{}:{line}", file.strip_prefix(src).unwrap_or(file).display());
                    graph.get_mut(m).map(|edges| edges.entry(used).or_insert(at));
                }
            }
        }
    }
    graph
}

/// A cycle of `graph`, as its modules with the first use of each edge.
fn find_cycle(graph: &Graph) -> Option<String> {
    fn visit(graph: &Graph, m: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<String> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_owned());
            let steps: Vec<String> =
                cycle.windows(2).map(|w| format!("{} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]])).collect();
            return Some(steps.join(", "));
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flat_map(BTreeMap::keys) {
            if let Some(cycle) = visit(graph, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|m| visit(graph, m, &mut Vec::new(), &mut done))
}

#[test]
fn modules_form_a_dag() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The reader works: an edge every layering has.
    assert!(graph["store"].contains_key("state"), "store -> state not found: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("the modules of controlplane/src have an import cycle: {cycle}");
    }
}

#[test]
fn the_reader_sees_paths_and_skips_comments_literals_and_tests() {
    let code = r##"
//! See [`crate::doc_only`].
use crate::{a::X, b::{Y, Z}, c};
use crate::d::W;
fn f() -> &'static str { let _ = '{'; let _ = r#"crate::raw"#; "crate::text" }
/* crate::block */
#[cfg(test)]
mod tests {
    use crate::test_only;
}
#[cfg(test)]
use crate::test_import;
fn g() { crate::e::run() }
"##;
    let names: Vec<String> = crate_paths(&drop_test_items(&blank(code))).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
}

#[test]
fn a_cycle_is_named_with_its_edges() {
    let mut graph = Graph::new();
    let edge = |to: &str| (to.to_owned(), format!("x.rs:{}", to.len()));
    graph.insert("x".into(), BTreeMap::from([edge("y")]));
    graph.insert("y".into(), BTreeMap::from([edge("z")]));
    graph.insert("z".into(), BTreeMap::from([edge("x")]));
    assert_eq!(find_cycle(&graph).as_deref(), Some("x -> y (x.rs:1), y -> z (x.rs:1), z -> x (x.rs:1)"));
    graph.get_mut("z").map(BTreeMap::clear);
    assert_eq!(find_cycle(&graph), None);
}
