//! `cargo xtask structure`: the module picture of every crate — which module uses which —
//! and the import circles in it, if any (then it fails: arrows go one way, see
//! docs/ARCHITECTURE.md). A module's own `mod tests` does not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Options of `cargo xtask structure`.
#[derive(clap::Args, Debug)]
pub struct StructureArgs {
    /// Print every crate's arrows, not only the circles.
    #[arg(long)]
    pub picture: bool,
}

/// The crates whose modules are checked (everything in the workspace but the fuzz crate).
const CRATES: [&str; 9] = [
    "agent",
    "datacenter",
    "host",
    "netconfig",
    "protocol",
    "sync-engine",
    "tests",
    "vpn",
    "xtask",
];

pub fn run(args: &StructureArgs) -> anyhow::Result<()> {
    let root = crate::util::project_root();
    let mut circles = Vec::new();
    for name in CRATES {
        let graph = crate_graph(&root.join(name).join("src"))?;
        if args.picture {
            println!("{name}:");
            for (from, to) in &graph {
                if !to.is_empty() {
                    let to: Vec<&str> = to.iter().map(String::as_str).collect();
                    println!("  {from} -> {}", to.join(", "));
                }
            }
        }
        for circle in cycles(&graph) {
            circles.push(format!("{name}: {}", circle.join(" <-> ")));
        }
    }
    if circles.is_empty() {
        println!("structure: no import circle in {} crates", CRATES.len());
        return Ok(());
    }
    for circle in &circles {
        eprintln!("import circle: {circle}");
    }
    anyhow::bail!(
        "{} import circle(s): move what both sides need below both",
        circles.len()
    )
}

/// Module path (`daemon::state`, `` for the root) to the modules its code names.
fn crate_graph(src: &Path) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files = Vec::new();
    collect(src, &mut files)?;
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .filter_map(|f| module_of(src, f).map(|m| (m, f.clone())))
        .collect();
    let known: BTreeSet<&str> = modules.keys().map(String::as_str).collect();
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        // The module's own tests use everything of it; they are not part of its structure.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        // Comments (doc links included) name modules without using them.
        let code: String = code
            .lines()
            .map(|line| line.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let mut uses = BTreeSet::new();
        for path in referenced_paths(&code, module) {
            // The longest known module the path starts with.
            let mut parts: Vec<&str> = path.split("::").collect();
            while !parts.is_empty() {
                let candidate = parts.join("::");
                if known.contains(candidate.as_str()) {
                    break;
                }
                parts.pop();
            }
            let target = parts.join("::");
            // A module naming its own children, or its own items, is not an arrow.
            let own_child = target.starts_with(&format!("{module}::")) || module.is_empty();
            if !target.is_empty() && target != *module && !own_child {
                uses.insert(target);
            }
        }
        graph.insert(module.clone(), uses);
    }
    Ok(graph)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            // `src/bin/*` are binaries of their own, each a root.
            if path.file_name().is_some_and(|n| n != "bin") {
                collect(&path, files)?;
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// `src/daemon/state.rs` → `daemon::state`; `src/daemon/mod.rs` → `daemon`; the root → ``.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
        parts.clear();
    }
    Some(parts.join("::"))
}

/// Every `crate::a::b` and `super::c` the code names, as paths from the crate root
/// (braced groups expanded one level: `crate::{a, b::c}`).
fn referenced_paths(code: &str, module: &str) -> Vec<String> {
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    let mut paths = Vec::new();
    for (prefix, base) in [("crate::", ""), ("super::", parent)] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let join = |tail: &str| {
                if base.is_empty() {
                    tail.to_owned()
                } else {
                    format!("{base}::{tail}")
                }
            };
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let item = item.trim();
                    if !item.is_empty() {
                        paths.push(join(&path_words(item)));
                    }
                }
            } else {
                paths.push(join(&path_words(rest)));
            }
        }
    }
    paths
}

/// The `a::b::c` at the start of `text`.
fn path_words(text: &str) -> String {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    text[..end].trim_end_matches(':').to_owned()
}

/// The circles of `graph`: its strongly connected parts of more than one module (Tarjan's).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.graph.get(node).into_iter().flatten() {
                let next = next.as_str();
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut part = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    part.push(top.to_owned());
                    if top == node {
                        break;
                    }
                }
                if part.len() > 1 {
                    part.sort();
                    self.found.push(part);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_circle_is_found_and_a_chain_is_not() {
        let graph = |edges: &[(&str, &str)]| {
            let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in edges {
                g.entry((*a).to_owned())
                    .or_default()
                    .insert((*b).to_owned());
                g.entry((*b).to_owned()).or_default();
            }
            g
        };
        assert!(cycles(&graph(&[("a", "b"), ("b", "c")])).is_empty());
        assert_eq!(
            cycles(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])),
            vec![vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]]
        );
    }

    #[test]
    fn paths_are_read_from_use_lines_and_code() {
        let code =
            "use crate::{a::B, c};\nuse super::d::E;\nfn f() { crate::x::y(); lbs_crate::no(); }";
        let mut paths = referenced_paths(code, "m::n");
        paths.sort();
        assert_eq!(paths, ["a::B", "c", "m::d::E", "x::y"]);
    }
}
